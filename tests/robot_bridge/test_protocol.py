"""Wire protocol: round trips of every message kind, zero-copy framing, and the decoder's rejections."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
import pytest

from cosmos_edge.robot_bridge.protocol import (
    PROTOCOL_VERSION,
    ActReply,
    ActRequest,
    ErrorCode,
    ErrorReply,
    MessageError,
    MetadataRequest,
    ModeSet,
    OutFrame,
    PingRequest,
    Pong,
    ServerMetadata,
    SetModeRequest,
    WireLimits,
    decode_reply,
    decode_request,
)
from cosmos_edge.runtime.errors import ConfigError, ProtocolError

CAMERAS = ("cam_left_wrist", "cam_right_wrist", "cam_high")
RNG = np.random.default_rng(0)


def act_request(**changes: Any) -> ActRequest:
    values: dict[str, Any] = {
        "request_id": 7,
        "obs_id": 42,
        "capture_time_ns": 1_700_000_000_000_000_000,
        "instruction": "fold the towel",
        "images": {name: RNG.integers(0, 256, (224, 224, 3), dtype=np.uint8) for name in CAMERAS},
        "proprio": RNG.standard_normal(14).astype(np.float32),
    }
    return ActRequest(**{**values, **changes})


def act_reply(**changes: Any) -> ActReply:
    values: dict[str, Any] = {
        "request_id": 7,
        "obs_id": 42,
        "actions": RNG.standard_normal((50, 14)).astype(np.float32),
        "value": 0.75,
        "mode": "reactive",
        "timings_ms": {"decode": 0.1, "dit": 12.5, "policy": 14.0},
        "server_version": "0.1.0",
        "server_receive_ns": 10,
        "server_send_ns": 20,
    }
    return ActReply(**{**values, **changes})


def metadata(**changes: Any) -> ServerMetadata:
    values: dict[str, Any] = {
        "request_id": 3,
        "platform": "aloha",
        "cameras": CAMERAS,
        "image_size": (224, 224),
        "chunk_size": 50,
        "control_rate_hz": 25.0,
        "action_dim": 14,
        "proprio_dim": 14,
        "modes": ("reactive", "planning"),
        "mode": "reactive",
        "instructions": ("fold the towel", "put the cube in the bowl"),
        "server_version": "0.1.0",
    }
    return ServerMetadata(**{**values, **changes})


ROUND_TRIPS = {
    "act": act_request(),
    "act with overrides": act_request(mode="planning", seed=0, steps=5),
    "act with a deadline": act_request(timeout_ms=250),
    "act asking for every candidate": act_request(planning_summary=True, return_all_query_results=True),
    "act asking for every depth's chunk": act_request(return_all_query_results=True, return_actions_by_depth=True),
    "act with one camera": act_request(images={"primary": np.zeros((8, 6, 3), np.uint8)}),
    "metadata": MetadataRequest(1),
    "ping": PingRequest(2**64 - 1),
    "set_mode": SetModeRequest(4, "planning"),
    "act_result": act_reply(),
    "act_result of a planning query": act_reply(
        planning="best_so_far", chosen_index=1, candidate_values=(0.5, 0.75, None)
    ),
    "act_result with every candidate": act_reply(
        planning="complete",
        chosen_index=0,
        candidate_values=(0.5, 0.25),
        candidate_values_by_depth=((0.5, 0.4), (0.25, 0.25)),
        candidate_actions=np.arange(2 * 50 * 14, dtype=np.float32).reshape(2, 50, 14),
    ),
    "act_result with every candidate's chunk at every depth": act_reply(
        planning="complete",
        chosen_index=0,
        candidate_values=(0.5, 0.25),
        candidate_values_by_depth=((0.5, 0.4), (0.25, 0.25)),
        candidate_actions=np.zeros((2, 50, 14), np.float32),
        candidate_actions_by_depth=np.arange(2 * 2 * 50 * 14, dtype=np.float32).reshape(2, 2, 50, 14),
    ),
    "metadata_result": metadata(),
    "metadata_result with joint limits": metadata(joint_limits=tuple((-1.0 - i, 1.0 + i) for i in range(14))),
    "pong": Pong(5, 123, "0.1.0"),
    "mode_set": ModeSet(6, "planning", "reactive"),
    "error": ErrorReply(7, ErrorCode.INVALID_FIELD, "proprio", "proprio: expected finite values"),
    "error without field": ErrorReply(0, ErrorCode.INTERNAL, "", "the policy failed"),
}


def assert_same(actual: object, expected: object) -> None:
    assert type(actual) is type(expected)
    for item in dataclasses.fields(expected):  # type: ignore[arg-type]
        got, want = getattr(actual, item.name), getattr(expected, item.name)
        if isinstance(want, np.ndarray):
            np.testing.assert_array_equal(got, want, strict=True)
        elif isinstance(want, Mapping) and any(isinstance(v, np.ndarray) for v in want.values()):
            assert list(got) == list(want)
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], strict=True)
        else:
            assert got == want, item.name


def bytes_of(frames: list[OutFrame]) -> list[bytes]:
    return [bytes(frame) for frame in frames]


@pytest.mark.parametrize("message", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip(message: Any) -> None:
    frames = bytes_of(message.to_frames())
    decode = decode_request if message.kind.value in ("act", "metadata", "ping", "set_mode") else decode_reply
    assert_same(decode(frames), message)


def test_header_layout() -> None:
    frames = act_request().to_frames()
    header = msgpack.unpackb(frames[0])
    assert header["kind"] == "act"
    assert header["protocol_version"] == PROTOCOL_VERSION
    assert header["request_id"] == 7
    assert header["fields"] == {
        "obs_id": 42,
        "capture_time_ns": 1_700_000_000_000_000_000,
        "instruction": "fold the towel",
    }
    assert header["arrays"][0] == {"name": "image/cam_left_wrist", "dtype": "uint8", "shape": [224, 224, 3]}
    assert header["arrays"][-1] == {"name": "proprio", "dtype": "float32", "shape": [14]}
    assert len(frames) == 1 + len(header["arrays"])


def test_arrays_are_sent_from_and_decoded_into_buffers_without_copies() -> None:
    request = act_request()
    frames = request.to_frames()
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), request.images["cam_left_wrist"])
    received = [bytearray(frame) for frame in frames]  # writable, like a zmq.Frame buffer
    decoded = decode_request(received)
    assert isinstance(decoded, ActRequest)
    image = decoded.images["cam_left_wrist"]
    assert np.shares_memory(image, np.frombuffer(received[1], np.uint8))
    assert not image.flags.writeable and not decoded.proprio.flags.writeable


def test_non_contiguous_arrays_are_sent_contiguous() -> None:
    wide = np.zeros((224, 448, 3), np.uint8)
    wide[:, ::2] = 9
    request = act_request(images={"cam_high": wide[:, ::2]})
    decoded = decode_request(bytes_of(request.to_frames()))
    assert isinstance(decoded, ActRequest)
    assert (decoded.images["cam_high"] == 9).all()


def test_a_map_key_that_is_not_a_string_is_named_as_such() -> None:
    frames = bytes_of(PingRequest(9).to_frames())
    header = msgpack.unpackb(frames[0])
    bad = msgpack.packb({**header, "fields": {b"torque": 1}}, use_bin_type=True)
    with pytest.raises(MessageError) as caught:
        decode_request([bad])
    assert caught.value.code is ErrorCode.MALFORMED
    assert str(caught.value).startswith("header: expected map keys that are strings, got a bytes key b'torque'")


def test_a_request_kind_is_not_a_reply() -> None:
    frames = bytes_of(PingRequest(9).to_frames())
    with pytest.raises(MessageError) as caught:
        decode_reply(frames)
    assert (caught.value.code, caught.value.request_id) == (ErrorCode.UNKNOWN_KIND, 9)


@pytest.mark.parametrize("kind", ["teleport", "pong"])
def test_an_unknown_kind_is_refused_naming_the_request_kinds_only(kind: str) -> None:
    header = msgpack.unpackb(bytes_of(PingRequest(9).to_frames())[0])
    with pytest.raises(MessageError) as caught:
        decode_request([msgpack.packb({**header, "kind": kind})])
    assert str(caught.value) == f"kind: expected one of ['act', 'metadata', 'ping', 'set_mode'], got {kind!r}"


def test_a_header_msgpack_cannot_read_is_named_with_the_reason() -> None:
    with pytest.raises(MessageError, match=r"header: expected a msgpack map, got bytes msgpack cannot read \(\w"):
        decode_request([b"\xc1"])  # 0xc1: the one byte msgpack never uses


# --- rejections ----------------------------------------------------------------------------------------------------

Frames = list[bytes]


def with_header(**changes: Any) -> Callable[[Frames], Frames]:
    def mutate(frames: Frames) -> Frames:
        header = msgpack.unpackb(frames[0])
        header.update(changes)
        header = {name: value for name, value in header.items() if value is not DROP}
        return [msgpack.packb(header), *frames[1:]]

    return mutate


def with_fields(**changes: Any) -> Callable[[Frames], Frames]:
    def mutate(frames: Frames) -> Frames:
        header = msgpack.unpackb(frames[0])
        header["fields"].update(changes)
        header["fields"] = {name: value for name, value in header["fields"].items() if value is not DROP}
        return [msgpack.packb(header), *frames[1:]]

    return mutate


def with_array(index: int, *, frame: bytes | None = None, **descriptor: Any) -> Callable[[Frames], Frames]:
    def mutate(frames: Frames) -> Frames:
        header = msgpack.unpackb(frames[0])
        header["arrays"][index].update(descriptor)
        new = list(frames)
        new[0] = msgpack.packb(header)
        if frame is not None:
            new[1 + index] = frame
        return new

    return mutate


def with_extra_array(name: str) -> Callable[[Frames], Frames]:
    def mutate(frames: Frames) -> Frames:
        header = msgpack.unpackb(frames[0])
        header["arrays"].append({"name": name, "dtype": "float32", "shape": [2]})
        return [msgpack.packb(header), *frames[1:], bytes(8)]

    return mutate


DROP = object()
PROPRIO = 3  # descriptor index of proprio: the three images come first
NAN_PROPRIO = np.full(14, np.nan, np.float32).tobytes()

# (mutation of a valid `act` request's frames, expected code, expected field)
REJECTIONS: dict[str, tuple[Callable[[Frames], Frames], ErrorCode, str]] = {
    "no frames": (lambda f: [], ErrorCode.MALFORMED, "frames"),
    "random header bytes": (lambda f: [b"\xc1\x00garbage", *f[1:]], ErrorCode.MALFORMED, "header"),
    "header not a map": (lambda f: [msgpack.packb([1, 2]), *f[1:]], ErrorCode.MALFORMED, "header"),
    "truncated header": (lambda f: [f[0][:-3], *f[1:]], ErrorCode.MALFORMED, "header"),
    "missing request id": (with_header(request_id=None), ErrorCode.INVALID_FIELD, "request_id"),
    "unknown header key": (with_header(extra=1), ErrorCode.INVALID_FIELD, "header.extra"),
    "future version": (with_header(protocol_version=2), ErrorCode.UNSUPPORTED_VERSION, "protocol_version"),
    "future version, new key": (
        with_header(protocol_version=2, extra=1),  # a newer sender: told the versions differ, not about its key
        ErrorCode.UNSUPPORTED_VERSION,
        "protocol_version",
    ),
    "future version, more frames than ours take": (
        lambda f: [*with_header(protocol_version=2)(f), *[b"1234"] * 16],
        ErrorCode.UNSUPPORTED_VERSION,
        "protocol_version",
    ),
    "version true": (with_header(protocol_version=True), ErrorCode.UNSUPPORTED_VERSION, "protocol_version"),
    "version float": (with_header(protocol_version=1.0), ErrorCode.UNSUPPORTED_VERSION, "protocol_version"),
    "version missing": (with_header(protocol_version=DROP), ErrorCode.UNSUPPORTED_VERSION, "protocol_version"),
    "unknown kind": (with_header(kind="teleport"), ErrorCode.UNKNOWN_KIND, "kind"),
    "reply kind": (with_header(kind="pong"), ErrorCode.UNKNOWN_KIND, "kind"),
    "fields not a map": (with_header(fields=[1]), ErrorCode.MALFORMED, "fields"),
    "one frame missing": (lambda f: f[:-1], ErrorCode.MALFORMED, "arrays"),
    "one frame too many": (lambda f: [*f, b"1234"], ErrorCode.MALFORMED, "arrays"),
    "descriptor keys": (with_array(0, extra=1), ErrorCode.MALFORMED, "arrays"),
    "dtype not allowed": (with_array(PROPRIO, dtype="float64"), ErrorCode.INVALID_FIELD, "proprio"),
    "pickled object dtype": (with_array(PROPRIO, dtype="object"), ErrorCode.INVALID_FIELD, "proprio"),
    "image not uint8": (
        with_array(0, dtype="float32", shape=[224, 224, 3], frame=bytes(224 * 224 * 3 * 4)),
        ErrorCode.INVALID_FIELD,
        "image/cam_left_wrist",
    ),
    "image with 4 channels": (
        with_array(0, shape=[224, 168, 4]),
        ErrorCode.INVALID_FIELD,
        "image/cam_left_wrist",
    ),
    "image 2-D": (with_array(0, shape=[224, 672]), ErrorCode.INVALID_FIELD, "image/cam_left_wrist"),
    "buffer shorter than shape": (with_array(PROPRIO, shape=[15]), ErrorCode.INVALID_FIELD, "proprio"),
    "negative dimension": (with_array(PROPRIO, shape=[-14]), ErrorCode.INVALID_FIELD, "proprio"),
    "empty proprio": (with_array(PROPRIO, shape=[0], frame=b""), ErrorCode.INVALID_FIELD, "proprio"),
    # Zero bytes pass every byte limit; the other sides are what must be bounded.
    "huge sides around a zero": (
        with_array(PROPRIO, shape=[2**32, 2**32, 0], frame=b""),
        ErrorCode.INVALID_FIELD,
        "proprio",
    ),
    "NaN proprio": (with_array(PROPRIO, frame=NAN_PROPRIO), ErrorCode.INVALID_FIELD, "proprio"),
    "unknown array": (with_extra_array("torques"), ErrorCode.INVALID_FIELD, "torques"),
    "array named twice": (with_array(1, name="image/cam_left_wrist"), ErrorCode.INVALID_FIELD, "image/cam_left_wrist"),
    "missing proprio": (with_array(PROPRIO, name="image/extra", shape=[1, 14, 1]), ErrorCode.INVALID_FIELD, "proprio"),
    "chunks by depth alone": (
        with_fields(return_actions_by_depth=True),
        ErrorCode.INVALID_FIELD,
        "return_actions_by_depth",
    ),
    "unknown field": (with_fields(torque=1.0), ErrorCode.INVALID_FIELD, "torque"),
    "missing field": (with_fields(obs_id=DROP), ErrorCode.INVALID_FIELD, "obs_id"),
    "bool as int": (with_fields(obs_id=True), ErrorCode.INVALID_FIELD, "obs_id"),
    "float as int": (with_fields(obs_id=1.0), ErrorCode.INVALID_FIELD, "obs_id"),
    "negative obs_id": (with_fields(obs_id=-1), ErrorCode.INVALID_FIELD, "obs_id"),
    "negative capture time": (with_fields(capture_time_ns=-5), ErrorCode.INVALID_FIELD, "capture_time_ns"),
    "empty instruction": (with_fields(instruction=""), ErrorCode.INVALID_FIELD, "instruction"),
    "huge instruction": (with_fields(instruction="x" * 5000), ErrorCode.INVALID_FIELD, "instruction"),
    "instruction as bytes": (with_fields(instruction=b"fold"), ErrorCode.INVALID_FIELD, "instruction"),
    "seed too large": (with_fields(seed=2**40), ErrorCode.INVALID_FIELD, "seed"),
    "zero steps": (with_fields(steps=0), ErrorCode.INVALID_FIELD, "steps"),
    "zero timeout": (with_fields(timeout_ms=0), ErrorCode.INVALID_FIELD, "timeout_ms"),
    "float timeout": (with_fields(timeout_ms=2.5), ErrorCode.INVALID_FIELD, "timeout_ms"),
    "mode not a string": (with_fields(mode=3), ErrorCode.INVALID_FIELD, "mode"),
}


@pytest.mark.parametrize(("mutate", "code", "field"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_decoder_rejects(mutate: Callable[[Frames], Frames], code: ErrorCode, field: str) -> None:
    frames = mutate(bytes_of(act_request().to_frames()))
    with pytest.raises(MessageError) as caught:
        decode_request(frames)
    error = caught.value
    assert (error.code, error.field) == (code, field), str(error)
    assert str(error).startswith(f"{field}: ")
    header_readable = code not in (ErrorCode.MALFORMED,) or field in ("fields", "arrays")
    assert error.request_id == (7 if header_readable and field != "request_id" else None)
    assert isinstance(error, ProtocolError)


@pytest.mark.parametrize(
    ("limits", "code", "field"),
    [
        (WireLimits(max_message_bytes=400_000, max_array_bytes=200_000), ErrorCode.TOO_LARGE, "message"),
        (WireLimits(max_array_bytes=100_000), ErrorCode.TOO_LARGE, "image/cam_left_wrist"),
        (WireLimits(max_header_bytes=64), ErrorCode.TOO_LARGE, "header"),
        (WireLimits(max_arrays=3), ErrorCode.TOO_LARGE, "frames"),
    ],
    ids=["message", "array", "header", "frame count"],
)
def test_limits(limits: WireLimits, code: ErrorCode, field: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode_request(bytes_of(act_request().to_frames()), limits)
    assert (caught.value.code, caught.value.field) == (code, field)
    # Past an oversized header, every refusal names the request its sender waits for.
    assert caught.value.request_id == (None if field == "header" else 7)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (1.0, "protocol_version: expected the integer 1, got float 1.0; upgrade the older side"),
        (DROP, "protocol_version: missing from the header; expected the integer 1"),
        (2, "protocol_version: expected the integer 1, got int 2; upgrade the older side"),
    ],
    ids=["float", "missing", "newer"],
)
def test_version_errors_say_what_was_wrong(version: object, message: str) -> None:
    with pytest.raises(MessageError) as caught:
        decode_request(with_header(protocol_version=version)(bytes_of(act_request().to_frames())))
    assert str(caught.value) == message


def test_requests_without_a_deadline_are_still_read() -> None:
    header = msgpack.unpackb(act_request().to_frames()[0])
    assert "timeout_ms" not in header["fields"]  # absent, as older clients send it: no deadline
    assert decode_request(bytes_of(act_request().to_frames())).timeout_ms is None


def test_messages_built_locally_are_validated_too() -> None:
    with pytest.raises(MessageError, match="proprio: expected dtype float32, got float64"):
        act_request(proprio=np.zeros(14))
    with pytest.raises(MessageError, match="actions: expected finite values"):
        act_reply(actions=np.full((50, 14), np.inf, np.float32))
    with pytest.raises(MessageError, match=r"candidate_values: expected a finite number in \[0.0, 1.0\], got 1.5"):
        act_reply(candidate_values=(0.5, 1.5))
    with pytest.raises(MessageError, match="chosen_index: expected"):
        act_reply(candidate_values=(0.5, 0.5), chosen_index=2)
    with pytest.raises(MessageError, match="candidate_actions: expected finite values"):
        act_reply(candidate_values=(0.5, 0.5), candidate_actions=np.full((2, 50, 14), np.nan, np.float32))
    with pytest.raises(MessageError, match=r"candidate_actions: expected one entry per candidate \(2\), got 3"):
        act_reply(candidate_values=(0.5, 0.5), candidate_actions=np.zeros((3, 50, 14), np.float32))
    with pytest.raises(MessageError, match="candidate_values_by_depth: expected candidate_values with it"):
        act_reply(candidate_values_by_depth=((0.5,),))
    with pytest.raises(MessageError, match="planning: expected one of"):
        act_reply(planning="done", candidate_values=(0.5,))
    with pytest.raises(MessageError, match="planning: expected a string"):
        act_reply(planning=["complete"], candidate_values=(0.5,))
    with pytest.raises(MessageError, match="candidate_values: expected with planning and chosen_index"):
        act_reply(planning="complete", chosen_index=0)
    with pytest.raises(MessageError, match="candidate_values_by_depth: expected rows of one width"):
        act_reply(candidate_values=(0.5, 0.5), candidate_values_by_depth=((0.5,), (0.5, 0.25)))
    with pytest.raises(MessageError, match="chosen_index: expected"):
        act_reply(chosen_index=-1)  # checked with or without candidate_values
    with pytest.raises(MessageError, match="return_all_query_results: expected true or false"):
        act_request(return_all_query_results="yes")
    with pytest.raises(MessageError, match="return_actions_by_depth: expected true or false"):
        act_request(return_actions_by_depth=1)
    with pytest.raises(MessageError, match=r"candidate_actions_by_depth: expected 2 entries per candidate"):
        act_reply(
            candidate_values=(0.5,),
            candidate_values_by_depth=((0.5, 0.25),),
            candidate_actions_by_depth=np.zeros((1, 3, 50, 14), np.float32),
        )
    with pytest.raises(MessageError, match=r"candidate_actions_by_depth: expected one entry per candidate \(2\)"):
        act_reply(candidate_values=(0.5, 0.5), candidate_actions_by_depth=np.zeros((1, 1, 50, 14), np.float32))
    with pytest.raises(MessageError, match="joint_limits: expected 14"):
        metadata(joint_limits=((0.0, 1.0),))
    with pytest.raises(MessageError, match=r"joint_limits\[0\]: expected lower < upper"):
        metadata(joint_limits=((1.0, 0.0),) * 14)
    with pytest.raises(MessageError, match=r"joint_limits\[3\]: expected a \(lower, upper\) pair, got 1 values"):
        metadata(joint_limits=((0.0, 1.0),) * 3 + ((1.0,),) + ((0.0, 1.0),) * 10)
    with pytest.raises(MessageError, match="mode: expected one of"):
        metadata(mode="dreaming")
    with pytest.raises(MessageError, match="code: expected one of"):
        ErrorReply(1, "oops", "", "message")


def test_numpy_scalars_are_normalised_to_python_numbers() -> None:
    request = act_request(obs_id=np.int64(5), seed=np.uint32(3))
    assert type(request.obs_id) is int and type(request.seed) is int
    assert decode_request(bytes_of(request.to_frames())).obs_id == 5


def test_error_reply_from_error_keeps_code_field_and_request() -> None:
    reply = ErrorReply.from_error(MessageError(ErrorCode.TOO_LARGE, "message", "expected less", request_id=12))
    assert (reply.request_id, reply.code, reply.field, reply.message) == (
        12,
        ErrorCode.TOO_LARGE,
        "message",
        "message: expected less",
    )
    assert ErrorReply.from_error(MessageError(ErrorCode.MALFORMED, "header", "bad")).request_id == 0


@pytest.mark.parametrize(
    "changes", [{"max_arrays": 0}, {"max_array_bytes": 2**30}, {"max_message_bytes": -1}, {"max_message_bytes": 2**63}]
)
def test_invalid_limits(changes: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        WireLimits(**changes)
