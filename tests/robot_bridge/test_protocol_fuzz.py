"""Property-based fuzzing of the decoder: whatever a peer sends, decoding either succeeds or raises a MessageError
that the server can answer with an error reply."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosmos_edge.robot_bridge.protocol import (
    ActRequest,
    ErrorReply,
    MessageError,
    WireLimits,
    decode_reply,
    decode_request,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL_LIMITS = WireLimits(max_message_bytes=4096, max_array_bytes=2048, max_header_bytes=2048, max_arrays=6)

# What msgpack can carry, nested a little: enough to reach every type check of the decoder.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
kinds = st.sampled_from(
    ["act", "metadata", "ping", "set_mode", "act_result", "metadata_result", "pong", "mode_set", "error"]
)
field_names = st.sampled_from(
    [
        *("obs_id", "capture_time_ns", "instruction", "mode", "seed", "steps", "value", "timings_ms", "server_version"),
        *("server_receive_ns", "server_send_ns", "platform", "cameras", "image_size", "chunk_size", "control_rate_hz"),
        *("action_dim", "proprio_dim", "modes", "instructions", "joint_limits", "server_time_ns", "previous_mode"),
        *("code", "field", "message", "extra"),
    ]
)
field_values = st.one_of(
    st.integers(min_value=-2, max_value=300),
    st.sampled_from(["reactive", "invalid_field", "fold", ""]),
    st.floats(min_value=-2, max_value=2),
    st.lists(st.sampled_from(["cam_high", "reactive"]), max_size=3),
    st.lists(st.lists(st.floats(min_value=-3, max_value=3), min_size=2, max_size=2), max_size=3),
    st.dictionaries(st.sampled_from(["dit", "vae"]), st.floats(min_value=0, max_value=9), max_size=2),
    values,
)
array_names = st.sampled_from(["proprio", "actions", "image/cam_high", "image/cam_low", "image/", "x"])


def sometimes(draw: st.DrawFn, usual: st.SearchStrategy[Any]) -> Any:
    """Mostly a plausible value, one time in eight anything msgpack can carry."""
    # Hypothesis favours small integers, so the plausible branch is the one taken on 0.
    return draw(usual) if draw(st.integers(0, 7)) < 7 else draw(values)


@st.composite
def structured_messages(draw: st.DrawFn) -> list[bytes]:
    """A header that is nearly right, with arrays whose frames mostly match their descriptors."""
    descriptors = []
    frames = []
    for _ in range(draw(st.integers(0, 4))):
        dtype = sometimes(draw, st.sampled_from(["uint8", "float32", "float64"]))
        shape = sometimes(draw, st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=3))
        descriptors.append({"name": sometimes(draw, array_names), "dtype": dtype, "shape": shape})
        plausible = isinstance(shape, list) and all(isinstance(side, int) and 0 <= side <= 5 for side in shape)
        size = int(np.prod(shape)) * (1 if dtype == "uint8" else 4) if plausible else 4
        frames.append(draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=64)))
    header: dict[str, Any] = {
        "kind": sometimes(draw, kinds),
        "protocol_version": sometimes(draw, st.just(1)),
        "request_id": sometimes(draw, st.integers(min_value=0, max_value=2**64 - 1)),
        "fields": sometimes(draw, st.dictionaries(field_names, field_values, max_size=8)),
        "arrays": sometimes(draw, st.just(descriptors)),
    }
    if draw(st.integers(0, 15)) == 15:
        header[draw(st.text(max_size=6) | st.binary(max_size=6))] = draw(values)
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode_both(frames: list[bytes]) -> None:
    for decode in (decode_request, decode_reply):
        try:
            decode(frames, SMALL_LIMITS)
        except MessageError as error:
            ErrorReply.from_error(error).to_frames()  # what the server answers: it must always be possible


@SETTINGS
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_frames_raise_only_message_errors(frames: list[bytes]) -> None:
    decode_both(frames)


@SETTINGS
@given(structured_messages())
def test_structured_headers_raise_only_message_errors(frames: list[bytes]) -> None:
    decode_both(frames)


VALID = [
    bytes(frame)
    for frame in ActRequest(
        1,
        obs_id=1,
        capture_time_ns=2,
        instruction="fold",
        images={"cam_high": np.zeros((4, 4, 3), np.uint8)},
        proprio=np.zeros(14, np.float32),
    ).to_frames()
]


@SETTINGS
@given(st.integers(min_value=0, max_value=len(VALID[0]) - 1), st.integers(min_value=0, max_value=255))
def test_corrupted_header_bytes_raise_only_message_errors(position: int, byte: int) -> None:
    header = bytearray(VALID[0])
    header[position] = byte
    decode_both([bytes(header), *VALID[1:]])
