"""Policy server over loopback TCP in one process: replies, hostile input, latest-wins queue, modes, CURVE."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from cosmos_edge.robot_bridge import curve as curve_module
from cosmos_edge.robot_bridge.act_messages import act_reply, sampled_chunks
from cosmos_edge.robot_bridge.binding import BoundRouter, ServerConfig, is_local_endpoint
from cosmos_edge.robot_bridge.client import PolicyClient, RemoteError, RequestTimeout
from cosmos_edge.robot_bridge.curve import CurveKeyPair, ServerCurve
from cosmos_edge.robot_bridge.log_limits import RateLimitedLog
from cosmos_edge.robot_bridge.protocol import (
    ActReply,
    ActRequest,
    ErrorCode,
    ErrorReply,
    MessageError,
    PingRequest,
    Pong,
    Reply,
    WireLimits,
    decode_reply,
    decode_request,
)
from cosmos_edge.robot_bridge.server import PolicyServer
from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import CandidateResults, ChunkResult, PlanningOutcome
from tests.helpers.bridge_doubles import (
    ALOHA,
    CUT_SHORT_CANDIDATES,
    INSTRUCTION,
    StubPolicy,
    expected_actions,
    observation,
    serving,
    wait_for,
)

ENDPOINT = "tcp://127.0.0.1:*"
TIMEOUT_S = 5.0  # generous: a loaded 2-core machine; every normal reply takes milliseconds
SHORT_TIMEOUT_S = 0.5  # where no reply is the expected outcome


class RawController:
    """A bare DEALER socket, to send what a well-behaved client never would and to keep several requests in flight."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        *,
        immediate: bool = False,
        routing_id: bytes | None = None,
    ) -> None:
        self.socket = context.socket(zmq.DEALER)
        if routing_id is not None:
            self.socket.setsockopt(zmq.ROUTING_ID, routing_id)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.IMMEDIATE, int(immediate))
        self.socket.connect(endpoint)
        self.next_id = 100

    def send(self, frames: list[bytes] | list[memoryview] | list[bytes | memoryview]) -> None:
        self.socket.send_multipart(frames, copy=False)

    def receive(self, timeout_s: float = TIMEOUT_S) -> Reply | None:
        if not self.socket.poll(round(timeout_s * 1e3)):
            return None
        return decode_reply(self.socket.recv_multipart())

    def barrier(self) -> None:
        """Returns once the server has handled everything sent so far: it reads each connection in order."""
        self.send(PingRequest(0).to_frames())
        assert isinstance(self.receive(), Pong)

    def act(self, level: float, *, obs_id: int = 1, **changes: object) -> int:
        self.next_id += 1
        obs = observation(level)
        fields = {"obs_id": obs_id, "capture_time_ns": 1, "instruction": INSTRUCTION, **vars(obs), **changes}
        self.send(ActRequest(self.next_id, **fields).to_frames())
        return self.next_id


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def policy() -> StubPolicy:
    return StubPolicy()


@pytest.fixture
def endpoint(policy: StubPolicy) -> Iterator[str]:
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT))) as endpoint:
        yield endpoint


def assert_answers(reply: Reply | None, request_id: int, level: float, seed: int = 195, offset: float = 0.0) -> None:
    assert isinstance(reply, ActReply), reply
    assert reply.request_id == request_id
    np.testing.assert_allclose(reply.actions, expected_actions(observation(level).proprio, seed, offset))


def test_metadata_ping_and_act(endpoint: str) -> None:
    with PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        metadata = client.metadata()
        assert (metadata.platform, metadata.cameras, metadata.image_size) == ("aloha", ALOHA.cameras, (224, 224))
        assert (metadata.chunk_size, metadata.action_dim, metadata.proprio_dim) == (50, 14, 14)
        assert (metadata.control_rate_hz, metadata.modes, metadata.mode) == (25.0, ("reactive",), "reactive")
        assert metadata.instructions == (INSTRUCTION,)
        assert client.ping().server_time_ns > 0
        before_ns = time.time_ns()
        reply = client.act(observation(3.0), INSTRUCTION, obs_id=17, capture_time_ns=before_ns, seed=7)
    assert reply.obs_id == 17 and reply.mode == "reactive" and reply.value == 0.25
    np.testing.assert_allclose(reply.actions, expected_actions(observation(3.0).proprio, seed=7))
    assert before_ns <= reply.server_receive_ns <= reply.server_send_ns <= time.time_ns()
    assert list(reply.timings_ms) == ["decode", "queue", "dit", "policy"]


def test_every_malformed_request_gets_an_error_reply_and_valid_ones_still_work(
    endpoint: str, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    controller = RawController(context, endpoint)
    valid = controller.act(1.0)
    assert_answers(controller.receive(), valid, 1.0)
    good = ActRequest(5, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, **vars(observation(2.0)))
    frames = [bytes(frame) for frame in good.to_frames()]
    header = msgpack.unpackb(frames[0])

    def rewritten(changed: dict[str | bytes, object] | None = None, **changes: object) -> list[bytes]:
        return [msgpack.packb({**header, **(changed or {}), **changes}), *frames[1:]]

    nan = np.full(14, np.nan, np.float32).tobytes()
    arrays = header["arrays"]
    cases: dict[str, tuple[list[bytes], ErrorCode]] = {
        "random bytes": ([np.random.default_rng(1).bytes(300)], ErrorCode.MALFORMED),
        "empty message": ([b""], ErrorCode.MALFORMED),
        "wrong number of frames": (frames[:-1], ErrorCode.MALFORMED),
        "bad msgpack header": ([b"\x85\xa4kind\xc1", *frames[1:]], ErrorCode.MALFORMED),
        "wrong dtype": (
            rewritten(arrays=[*arrays[:3], {**arrays[3], "dtype": "uint8", "shape": [56]}]),
            ErrorCode.INVALID_FIELD,
        ),
        "wrong image shape": (
            rewritten(arrays=[{**arrays[0], "shape": [112, 448, 3]}, *arrays[1:]]),
            ErrorCode.INVALID_FIELD,
        ),
        "NaN proprio": ([*frames[:-1], nan], ErrorCode.INVALID_FIELD),
        "unknown field": (rewritten(fields={**header["fields"], "torque": 1}), ErrorCode.INVALID_FIELD),
        "a field named in bytes": (rewritten(fields={**header["fields"], b"torque": 1}), ErrorCode.MALFORMED),
        "header keys in bytes and text": (rewritten({b"extra": 1, "more": 2}), ErrorCode.MALFORMED),
        "future protocol": (rewritten(protocol_version=99), ErrorCode.UNSUPPORTED_VERSION),
        "reply kind": (rewritten(kind="act_result"), ErrorCode.UNKNOWN_KIND),
        "unknown instruction": (
            rewritten(fields={**header["fields"], "instruction": "dance"}),
            ErrorCode.INVALID_INPUT,
        ),
        "unknown mode": (rewritten(fields={**header["fields"], "mode": "dreaming"}), ErrorCode.UNKNOWN_MODE),
    }
    for name, (bad_frames, code) in cases.items():
        controller.send(bad_frames)
        reply = controller.receive()
        assert isinstance(reply, ErrorReply), name
        assert reply.code is code, (name, reply)
        assert reply.message, name
        valid = controller.act(float(len(name)))
        assert_answers(controller.receive(), valid, float(len(name)))


def test_errors_name_the_field_and_answer_the_request(endpoint: str, context: zmq.Context[zmq.Socket[bytes]]) -> None:
    controller = RawController(context, endpoint)
    obs = observation()
    controller.act(0.0, proprio=np.zeros(7, np.float32))
    reply = controller.receive()
    assert isinstance(reply, ErrorReply)
    assert (reply.request_id, reply.code, reply.field) == (controller.next_id, ErrorCode.INVALID_FIELD, "proprio")
    assert reply.message == "proprio: expected shape (14,), got (7,)"
    controller.act(0.0, images={"cam_high": obs.images["cam_high"]})
    reply = controller.receive()
    assert isinstance(reply, ErrorReply) and (reply.request_id, reply.field) == (controller.next_id, "images")
    assert "cam_left_wrist" in reply.message
    controller.act(0.0, images={**obs.images, "cam_high": np.zeros((480, 640, 3), np.uint8)})  # a camera frame
    reply = controller.receive()
    assert isinstance(reply, ErrorReply) and (reply.request_id, reply.field) == (controller.next_id, "image/cam_high")
    assert reply.message == "image/cam_high: expected shape (224, 224, 3) (the client resizes), got (480, 640, 3)"


def test_unknown_instructions_are_refused_before_the_queue_naming_the_closest_known() -> None:
    gate = threading.Event()  # never opened while requests are sent: one that reached a policy would get no answer
    known = ("put the cube in the bowl", "fold the towel", "put the candy in the bag")
    policies = {
        "reactive": StubPolicy(gate=gate, instructions=known),
        "planning": StubPolicy(gate=gate, instructions=known[2:]),  # each mode has its own text embeddings
    }
    cases = {
        (
            "put the cube in a bowl",
            "reactive",
        ): "['put the cube in the bowl', 'put the candy in the bag', 'fold the towel']",
        ("fold the towel", "planning"): "['put the candy in the bag']",
    }
    with serving(PolicyServer(policies, ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        for (instruction, mode), closest in cases.items():
            with pytest.raises(RemoteError) as caught:
                client.act(observation(), instruction, obs_id=1, capture_time_ns=1, mode=mode)
            assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_INPUT, "instruction")
            expected = f"instruction: no text embedding for {instruction!r} in mode {mode!r}; closest known: {closest}"
            assert caught.value.detail == expected
        gate.set()
    assert not policies["reactive"].queries and not policies["planning"].queries


def test_oversized_messages(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    limits = WireLimits(max_message_bytes=460_000, max_array_bytes=200_000)  # an act of 3 images of 150 kB fits
    with serving(PolicyServer(StubPolicy(), ServerConfig(ENDPOINT, limits=limits))) as endpoint:
        controller = RawController(context, endpoint)
        request = ActRequest(7, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, **vars(observation(1.0)))
        controller.send([*request.to_frames(), bytes(100_000)])  # each frame fits, the message does not
        request_id = request.request_id
        reply = controller.receive()
        assert isinstance(reply, ErrorReply) and (reply.code, reply.field) == (ErrorCode.TOO_LARGE, "message")
        assert reply.request_id == request_id  # so a client matches it to its request instead of timing out
        # A single frame over the limit never reaches us: libzmq drops it and the sender's connection.
        flooder = RawController(context, endpoint)
        flooder.send([PingRequest(1).to_frames()[0], bytes(500_000)])
        assert flooder.receive(SHORT_TIMEOUT_S) is None
        controller.send(PingRequest(2).to_frames())
        assert isinstance(controller.receive(), Pong)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (
            WireLimits(max_message_bytes=400_000, max_array_bytes=200_000),
            r"^max_message_bytes: 400000 bytes cannot hold one act of the aloha platform \(about 459832 bytes",
        ),
        (
            WireLimits(max_message_bytes=1_000_000, max_array_bytes=100_000),
            r"^max_array_bytes: 100000 bytes cannot hold one camera image \(224x224x3 uint8, 150528\)$",
        ),
        (WireLimits(max_arrays=3), r"^max_arrays: 3 cannot hold one act of the aloha platform \(its 3 camera images"),
        (WireLimits(max_header_bytes=64), r"^max_header_bytes: 64 bytes cannot hold an act's header \(up to 8192"),
    ],
    ids=["message", "array", "arrays", "header"],
)
def test_limits_that_cannot_hold_an_act_are_refused_at_once(limits: WireLimits, message: str) -> None:
    # libzmq would drop such frames without a reply: every controller would wait out its timeout.
    with pytest.raises(ConfigError, match=message):
        PolicyServer(StubPolicy(), ServerConfig(ENDPOINT, limits=limits))


def test_a_newer_observation_replaces_the_waiting_one(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT))) as endpoint:
        controller = RawController(context, endpoint)
        first = controller.act(1.0, obs_id=1)
        assert policy.started.wait(TIMEOUT_S)  # obs 1 is being inferred; the next ones wait
        second = controller.act(2.0, obs_id=2)
        third = controller.act(3.0, obs_id=3)
        superseded = controller.receive()
        assert isinstance(superseded, ErrorReply)
        assert (superseded.request_id, superseded.code) == (second, ErrorCode.SUPERSEDED)
        assert superseded.message == "obs_id: observation 2 replaced by 3 before it ran"
        gate.set()
        assert_answers(controller.receive(), first, 1.0)
        assert_answers(controller.receive(), third, 3.0)
    assert [float(query.observation.proprio[0]) for query in policy.queries] == [1.0, 3.0]


def test_ping_and_metadata_are_answered_while_inferring(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT))) as endpoint:
        controller = RawController(context, endpoint)
        request = controller.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        with PolicyClient(endpoint, timeout_s=TIMEOUT_S) as other:
            assert other.ping().request_id == 1
            assert other.metadata().platform == "aloha"
        gate.set()
        assert_answers(controller.receive(), request, 1.0)


def test_controllers_beyond_max_pending_are_told_to_retry(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT, max_pending=1))) as endpoint:
        running, waiting, refused = (RawController(context, endpoint) for _ in range(3))
        first = running.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        second = waiting.act(2.0)
        waiting.barrier()
        refused.act(3.0)
        reply = refused.receive()
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.OVERLOADED
        gate.set()
        assert_answers(running.receive(), first, 1.0)
        assert_answers(waiting.receive(), second, 2.0)


def test_modes_switch_and_can_be_chosen_per_request() -> None:
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(offset=100.0)}
    with serving(PolicyServer(policies, ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        obs = observation(1.0)
        assert client.act(obs, INSTRUCTION, obs_id=1, capture_time_ns=1).mode == "reactive"
        reply = client.act(obs, INSTRUCTION, obs_id=2, capture_time_ns=1, mode="planning")
        assert reply.mode == "planning"
        np.testing.assert_allclose(reply.actions, expected_actions(obs.proprio, offset=100.0))
        switched = client.set_mode("planning")
        assert (switched.mode, switched.previous_mode) == ("planning", "reactive")
        assert client.metadata().mode == "planning"
        assert client.act(obs, INSTRUCTION, obs_id=3, capture_time_ns=1).mode == "planning"
        with pytest.raises(RemoteError) as caught:
            client.set_mode("dreaming")
        assert caught.value.code is ErrorCode.UNKNOWN_MODE and "'reactive', 'planning'" in caught.value.detail


def test_planning_replies_carry_the_outcome_and_the_candidates(caplog: pytest.LogCaptureFixture) -> None:
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(candidates=CUT_SHORT_CANDIDATES)}
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    with serving(PolicyServer(policies, ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        obs = observation(1.0)
        reactive = client.act(obs, INSTRUCTION, obs_id=1, capture_time_ns=1, return_all_query_results=True)
        assert reactive.planning is None and reactive.candidate_values is None and reactive.candidate_actions is None
        brief = client.act(obs, INSTRUCTION, obs_id=2, capture_time_ns=1, mode="planning")
        assert (brief.planning, brief.chosen_index, brief.candidate_values) == ("best_so_far", 1, (0.5, 0.75, None))
        assert brief.candidate_actions is None and brief.candidate_values_by_depth is None
        every = functools.partial(client.act, obs, INSTRUCTION, mode="planning", return_all_query_results=True)
        without_chunks = every(obs_id=3, capture_time_ns=1)
        full = every(obs_id=4, capture_time_ns=1, return_actions_by_depth=True)
    assert without_chunks.candidate_actions is not None and without_chunks.candidate_actions_by_depth is None
    assert full.candidate_values_by_depth == ((0.5, 0.25), (0.75, 1.0), (None, None))
    assert full.candidate_actions is not None and full.candidate_actions_by_depth is not None
    np.testing.assert_array_equal(full.candidate_actions[:2], CUT_SHORT_CANDIDATES.actions[:2])
    np.testing.assert_array_equal(full.candidate_actions[2], 0.0)  # not computed in time: zeros on the wire
    np.testing.assert_array_equal(full.candidate_actions_by_depth[:2], CUT_SHORT_CANDIDATES.actions_by_depth[:2])
    np.testing.assert_array_equal(full.candidate_actions_by_depth[2], 0.0)
    # The gaps restored from the null values: what the policy returned, NaN where nothing was sampled.
    actions, chunks = sampled_chunks(full)
    np.testing.assert_array_equal(actions, CUT_SHORT_CANDIDATES.actions)
    np.testing.assert_array_equal(chunks, CUT_SHORT_CANDIDATES.actions_by_depth)
    assert "planning=best_so_far deadline_passed_total=1" in caplog.text
    assert "planning=best_so_far deadline_passed_total=2" in caplog.text


def test_the_base_chunk_of_an_unranked_reply_and_a_ranked_out_chunk_travel_as_sampled_chunks_say() -> None:
    # A deadline that passed before any ranking: the base action pass is the chunk, its value null. Candidate 1's
    # chunk overflowed (infinity) and was ranked out: its values are null, its chunk travels as zeros.
    chunks = np.stack([np.full((1, ALOHA.chunk_size, ALOHA.action_dim), value, np.float32) for value in (3.0, np.inf)])
    unranked = CandidateResults(
        chosen=0,
        actions=chunks[:, 0],
        values=np.full(2, np.nan),
        values_by_depth=np.full((2, 1), np.nan, np.float32),
        actions_by_depth=chunks,
        outcome=PlanningOutcome.REACTIVE,
    )
    result = ChunkResult(chunks[0, 0], 0.5, np.zeros(ALOHA.proprio_dim, np.float32), candidates=unranked)
    request = ActRequest(
        1,
        obs_id=1,
        capture_time_ns=1,
        instruction=INSTRUCTION,
        return_all_query_results=True,
        return_actions_by_depth=True,
        **vars(observation(1.0)),
    )
    reply = act_reply(request, result, ALOHA, mode="planning", timings_ms={}, receive_ns=1)
    decoded = decode_reply(reply.to_frames())  # finite on the wire: any client decodes it
    assert (
        isinstance(decoded, ActReply)
        and decoded.candidate_actions is not None
        and np.isfinite(decoded.candidate_actions).all()
    )
    actions, by_depth = sampled_chunks(decoded)
    assert actions is not None and by_depth is not None
    np.testing.assert_array_equal(actions[0], chunks[0, 0])  # the reply's own chunk
    assert np.isnan(actions[1]).all() and np.isnan(by_depth[1]).all()
    # Ranked, with the base candidate ranked out for its overflowed chunk: it lists none (never the wire's zeros).
    swapped = chunks[::-1]
    ranked = dataclasses.replace(
        unranked,
        chosen=1,
        actions=swapped[:, 0],
        actions_by_depth=swapped,
        values=np.array([np.nan, 0.5]),
        values_by_depth=np.array([[np.nan], [0.5]], np.float32),
        outcome=PlanningOutcome.COMPLETE,
    )
    result = ChunkResult(swapped[1, 0], 0.5, np.zeros(ALOHA.proprio_dim, np.float32), candidates=ranked)
    decoded = decode_reply(act_reply(request, result, ALOHA, mode="planning", timings_ms={}, receive_ns=1).to_frames())
    assert isinstance(decoded, ActReply)
    actions, by_depth = sampled_chunks(decoded)
    assert actions is not None and by_depth is not None
    assert np.isnan(actions[0]).all() and np.isnan(by_depth[0]).all()
    np.testing.assert_array_equal(actions[1], swapped[1, 0])


def test_chunks_at_every_depth_too_large_for_a_client_are_refused_naming_the_field() -> None:
    # 64 candidates searching 3 deep over 16 predicted states: 33 chunks each, 5.9 MB in one array.
    chunks = np.zeros((64, 33, ALOHA.chunk_size, ALOHA.action_dim), np.float32)
    deep = dataclasses.replace(
        CUT_SHORT_CANDIDATES,
        actions=chunks[:, 0],
        values=np.full(64, 0.5),
        values_by_depth=np.full((64, 33), 0.5, np.float32),
        actions_by_depth=chunks,
    )
    server = PolicyServer(StubPolicy(candidates=deep), ServerConfig(ENDPOINT))
    with serving(server) as endpoint, PolicyClient(endpoint) as client:
        every = functools.partial(client.act, observation(1.0), INSTRUCTION, return_all_query_results=True)
        with pytest.raises(RemoteError) as refused:
            every(obs_id=1, capture_time_ns=1, return_actions_by_depth=True)
        assert refused.value.field == "return_actions_by_depth" and "ask without it" in refused.value.detail
        assert every(obs_id=2, capture_time_ns=1).candidate_values_by_depth is not None  # and it keeps serving
        # A front end that decodes nothing (the official HTTP /act) gets them: its client has no such limit.
        asked = dataclasses.replace(act_request(1.0, 3), return_all_query_results=True, return_actions_by_depth=True)
        reply = server.submit(asked, peer="http").result(timeout=TIMEOUT_S)
        assert reply.candidate_actions_by_depth is not None and reply.candidate_actions_by_depth.shape == chunks.shape


def test_a_client_that_predates_the_planning_fields_gets_replies_it_can_decode(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = PolicyServer(StubPolicy(candidates=CUT_SHORT_CANDIDATES), ServerConfig(ENDPOINT))  # as a planner
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    with serving(server):
        reply = server.submit(act_request(1.0, 7), peer="old client").result(timeout=TIMEOUT_S)
    assert reply.planning is None and reply.chosen_index is None and reply.candidate_values is None
    assert "planning=best_so_far deadline_passed_total=1" in caplog.text  # the log counts what happened


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (StubPolicy(failure=RuntimeError("CUDA error")), "failed (RuntimeError)"),
        (StubPolicy(actions_shape=(49, 14)), "failed (ValueError)"),
    ],
    ids=["raises", "wrong shape"],
)
def test_a_failing_policy_gets_internal_errors_and_serving_goes_on(
    policy: StubPolicy, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        for obs_id in (1, 2):
            with pytest.raises(RemoteError) as caught:
                client.act(observation(), INSTRUCTION, obs_id=obs_id, capture_time_ns=1)
            assert caught.value.code is ErrorCode.INTERNAL and message in caught.value.detail
            assert "Traceback" not in caught.value.detail
        assert client.ping()
    assert "policy mode=reactive failed on obs_id=1" in caplog.text


def test_an_input_error_of_the_policy_names_its_field_in_the_reply() -> None:
    failure = InputError("proprio: 1e+30 at index [0] lies far outside the dataset range", field="proprio")
    with (
        serving(PolicyServer({"reactive": StubPolicy(failure=failure)}, ServerConfig(ENDPOINT))) as endpoint,
        PolicyClient(endpoint) as client,
        pytest.raises(RemoteError) as caught,
    ):
        client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
    assert (caught.value.code, caught.value.field) == (ErrorCode.INVALID_INPUT, "proprio")
    assert caught.value.detail == str(failure)  # named once, not "proprio: proprio: ..."


@pytest.mark.parametrize("failure", [InputError(""), InputError("no field", field=None)])  # type: ignore[arg-type]
def test_a_policy_error_without_a_message_or_field_is_answered_and_serving_goes_on(failure: InputError) -> None:
    with (
        serving(PolicyServer({"reactive": StubPolicy(failure=failure)}, ServerConfig(ENDPOINT))) as endpoint,
        PolicyClient(endpoint) as client,
    ):
        with pytest.raises(RemoteError) as caught:
            client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
        assert caught.value.code is ErrorCode.INVALID_INPUT and caught.value.detail
        assert client.ping()


def test_a_message_the_server_fails_on_is_answered_internal_and_serving_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    failures = iter([RuntimeError("a decoder defect")])

    def decode_once_failing(frames: object, limits: object) -> object:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return decode_request(frames, limits)  # type: ignore[arg-type]

    monkeypatch.setattr("cosmos_edge.robot_bridge.server.decode_request", decode_once_failing)
    with serving(PolicyServer(StubPolicy(), ServerConfig(ENDPOINT))) as endpoint:
        controller = RawController(context, endpoint)
        controller.send(PingRequest(7).to_frames())
        reply = controller.receive()  # its id unknown, as for a message that cannot be read: 0
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.INTERNAL and "RuntimeError" in reply.message
        controller.barrier()  # the server lives on
    assert "a decoder defect" in caplog.text  # its traceback is logged for whoever fixes it


def test_the_wake_ups_of_answers_are_consumed() -> None:
    """The I/O thread reads each wake-up before it flushes the answer; one left unread made every later poll return
    at once, and the idle server spun a core at 100 %."""
    server = PolicyServer({"reactive": StubPolicy()}, ServerConfig(ENDPOINT))
    with serving(server) as endpoint, PolicyClient(endpoint) as client:
        client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
        assert server._wake is not None
        with pytest.raises(BlockingIOError):  # nothing left to read
            server._wake[0].recv(1, socket.MSG_PEEK)


def test_a_field_name_sent_by_a_peer_cannot_forge_a_log_line(
    endpoint: str, context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    controller = RawController(context, endpoint)
    header = msgpack.unpackb(PingRequest(9).to_frames()[0])
    forged = "x\nINFO cosmos_edge.robot_bridge.server: kind=act peer=forged status=ok"
    controller.send([msgpack.packb({**header, forged: 1})])
    refused = controller.receive()
    assert isinstance(refused, ErrorReply) and refused.field == f"header.{forged}"  # the reply names it as sent
    controller.barrier()  # the refusal is logged after its reply is sent
    (line,) = (r.getMessage() for r in caplog.records if r.getMessage().startswith("kind=error"))
    assert "\n" not in line and "field='header.x\\nINFO cosmos_edge.robot_bridge.server: kind=act peer=for'... " in line


def test_one_structured_log_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    policies = {"reactive": StubPolicy(), "planning": StubPolicy(failure=InputError("proprio: out of range"))}
    with serving(PolicyServer(policies, ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        client.act(observation(), INSTRUCTION, obs_id=5, capture_time_ns=1)
        for instruction, mode in ((INSTRUCTION, "planning"), ("dance", "reactive")):
            with pytest.raises(RemoteError):
                client.act(observation(), instruction, obs_id=6, capture_time_ns=1, mode=mode)
    ok, failed = (r.getMessage() for r in caplog.records if r.getMessage().startswith("kind=act"))
    assert "obs_id=5 mode=reactive status=ok decode_ms=" in ok and "dit_ms=1.500" in ok and "total_ms=" in ok
    assert "obs_id=6 mode=planning status=invalid_input policy_ms=" in failed
    (refused,) = (r.getMessage() for r in caplog.records if r.getMessage().startswith("kind=error"))
    assert "request_id=3 code=invalid_input field=instruction total_ms=" in refused


def test_rejections_are_logged_once_per_peer_per_interval_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("cosmos_edge.robot_bridge.server"), 1.0, 2, clock=lambda: now[0])
    for peer in ("a", "a", "b", "a", "c", "b"):  # "c" is over the 2 lines of the interval
        log.log(peer, logging.INFO, "rejected peer=%s", peer)
    now[0] = 0.5
    log.tick()
    assert [r.getMessage() for r in caplog.records] == ["rejected peer=a", "rejected peer=b"]
    now[0] = 1.0
    log.log("a", logging.INFO, "rejected peer=%s", "a")
    assert [r.getMessage() for r in caplog.records][2:] == [
        "kind=error held_back=4 window_s=1.0 (at most one line per peer per 1.0 s)",
        "rejected peer=a",
    ]


def test_a_flood_of_bad_requests_is_answered_but_not_logged_line_by_line(
    endpoint: str, context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    flooder = RawController(context, endpoint)
    started = time.monotonic()
    for _ in range(200):
        flooder.send([b"garbage"])
        reply = flooder.receive()
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.MALFORMED
    windows = math.ceil(time.monotonic() - started) + 1  # a line per 1 s window at most, however slow the machine
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kind=error peer=")]
    assert 1 <= len(lines) <= windows


def one_running_one_waiting(
    context: zmq.Context[zmq.Socket[bytes]], endpoint: str, policy: StubPolicy
) -> tuple[RawController, int, RawController]:
    """A controller whose request the gated `policy` is computing (with its request id), and another whose request
    the server has queued behind it."""
    running = RawController(context, endpoint)
    request_id = running.act(1.0)
    assert policy.started.wait(TIMEOUT_S)
    waiting = RawController(context, endpoint)
    waiting.act(2.0)
    waiting.barrier()
    return running, request_id, waiting


def test_stop_answers_waiting_requests_and_returns(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT))
    with serving(server) as endpoint:
        controller, first, waiting = one_running_one_waiting(context, endpoint, policy)
        server.stop()
        reply = waiting.receive()
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.SHUTTING_DOWN
        gate.set()
    assert_answers(controller.receive(), first, 1.0)  # the chunk in progress is still delivered


def test_stop_takes_no_lock_so_a_signal_during_shutdown_cannot_deadlock() -> None:
    """A signal handler runs on the I/O thread, between two of its bytecodes: had `stop` to take a lock the I/O
    thread holds at that moment (the server's own, or its stop event's, which `Event.set` takes), a second Ctrl-C
    during shutdown would hang the process."""
    server = PolicyServer(StubPolicy(), ServerConfig(ENDPOINT))
    locks = (server._queue._lock, server._mode_lock, server._stopping._cond)  # type: ignore[attr-defined]
    with locks[0], locks[1], locks[2]:  # (CPython's Event holds a Condition)
        stopping = threading.Thread(target=server.stop, daemon=True)
        stopping.start()
        stopping.join(TIMEOUT_S)
        assert not stopping.is_alive()


def test_a_worker_that_dies_answers_its_request_and_stops_the_server(
    context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate, failure=SystemExit(3))  # escapes the policy's `except Exception`
    server = PolicyServer(policy, ServerConfig(ENDPOINT))
    endpoint = server.start()
    raised: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        assert server.wait_until_accepting(TIMEOUT_S)  # an act sent before would be answered `overloaded`
        running, _, waiting = one_running_one_waiting(context, endpoint, policy)
        gate.set()
        died = running.receive()
        assert isinstance(died, ErrorReply) and died.code is ErrorCode.INTERNAL and "worker died" in died.message
        stopped = waiting.receive()
        assert isinstance(stopped, ErrorReply) and stopped.code is ErrorCode.SHUTTING_DOWN
    finally:
        gate.set()
        thread.join(TIMEOUT_S)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], EngineError) and "worker died (SystemExit)" in str(raised[0])
    assert "the policy worker died; stopping the server" in caplog.text


def test_a_reply_that_cannot_be_encoded_is_answered_with_an_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    encode = ActReply.to_frames
    failures = iter([True])

    def failing_once(reply: ActReply) -> list[object]:
        if next(failures, False):
            raise OverflowError("a field out of the wire's range")
        return encode(reply)

    monkeypatch.setattr(ActReply, "to_frames", failing_once)
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    with serving(PolicyServer(StubPolicy(), ServerConfig(ENDPOINT))) as endpoint, PolicyClient(endpoint) as client:
        with pytest.raises(RemoteError) as caught:
            client.act(observation(1.0), INSTRUCTION, obs_id=1, capture_time_ns=1)
        assert caught.value.code is ErrorCode.INTERNAL and "could not be encoded (OverflowError)" in caught.value.detail
        reply = client.act(observation(2.0), INSTRUCTION, obs_id=2, capture_time_ns=1)
        np.testing.assert_allclose(reply.actions, expected_actions(observation(2.0).proprio, 195, 0.0))
    assert "could not encode the reply" in caplog.text
    assert "status=internal" in caplog.text


def act_request(level: float, request_id: int, mode: str | None = None) -> ActRequest:
    fields = {"obs_id": request_id, "capture_time_ns": 1, "instruction": INSTRUCTION, "mode": mode}
    return ActRequest(request_id, **fields, **vars(observation(level)))


@dataclass(frozen=True)
class BusyServer:
    """A server whose worker holds a controller's `act` (request `first`) until `gate` is set."""

    server: PolicyServer
    policy: StubPolicy
    gate: threading.Event
    endpoint: str
    controller: RawController
    first: int


@contextmanager
def busy_server(context: zmq.Context[zmq.Socket[bytes]], max_pending: int = 8) -> Iterator[BusyServer]:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT, max_pending=max_pending))
    with serving(server) as endpoint:
        controller = RawController(context, endpoint)
        first = controller.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        yield BusyServer(server, policy, gate, endpoint, controller, first)


def test_submitted_requests_wait_for_the_same_worker(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    with busy_server(context) as busy:
        server, policy, gate, controller, first = busy.server, busy.policy, busy.gate, busy.controller, busy.first
        abandoned = server.submit(act_request(2.0, 2), peer="test")
        answered = server.submit(act_request(3.0, 3), peer="test")  # never replaces another, though from one sender
        assert abandoned.cancel()
        gate.set()
        assert_answers(answered.result(TIMEOUT_S), 3, 3.0)
        assert_answers(controller.receive(), first, 1.0)
        assert len(policy.queries) == 2  # the cancelled one never ran
        with pytest.raises(MessageError) as caught:
            server.submit(act_request(4.0, 4, mode="dreaming"), peer="test")
        assert caught.value.code is ErrorCode.UNKNOWN_MODE
    with pytest.raises(MessageError) as caught:
        server.submit(act_request(5.0, 5), peer="test")
    assert caught.value.code is ErrorCode.SHUTTING_DOWN


def test_cancelled_submissions_give_up_their_places(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    with busy_server(context, max_pending=2) as busy:
        gone = [busy.server.submit(act_request(2.0 + i, 2 + i), peer="test") for i in range(2)]  # the queue is full
        assert all(future.cancel() for future in gone)  # their HTTP clients disconnected
        live = busy.server.submit(act_request(5.0, 5), peer="test")  # not `overloaded`
        busy.gate.set()
        assert_answers(live.result(TIMEOUT_S), 5, 5.0)
        assert len(busy.policy.queries) == 2  # the first, then the live one: the cancelled never ran


def test_a_failure_handling_a_readable_request_is_answered_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(request_id: int) -> None:
        raise RuntimeError("a metadata defect")

    server = PolicyServer(StubPolicy(), ServerConfig(ENDPOINT))
    monkeypatch.setattr(server, "_metadata", failing)
    with serving(server) as endpoint, PolicyClient(endpoint) as client:
        with pytest.raises(RemoteError) as caught:  # its own id: the client takes the answer, no timeout
            client.metadata()
        assert caught.value.code is ErrorCode.INTERNAL and "RuntimeError" in caught.value.detail
        assert client.ping()


def test_no_zeromq_peer_can_replace_a_submitted_request(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    with busy_server(context) as busy:
        submitted = busy.server.submit(act_request(2.0, 2), peer="test")
        # A peer picks its identity freely, zero-prefixed ones included (libzmq reserves them only by convention).
        impostors = [
            RawController(context, busy.endpoint, routing_id=key) for key in (b"\x00submit-1", b"\x00\x00\x00\x00\x01")
        ]
        sent = [impostor.act(3.0) for impostor in impostors]
        busy.gate.set()
        assert_answers(busy.controller.receive(), busy.first, 1.0)
        assert_answers(submitted.result(TIMEOUT_S), 2, 2.0)
        for impostor, request_id in zip(impostors, sent, strict=True):
            assert_answers(impostor.receive(), request_id, 3.0)


def test_stop_fails_the_submitted_requests_still_waiting() -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT))
    with serving(server):
        running = server.submit(act_request(1.0, 1), peer="test")
        assert policy.started.wait(TIMEOUT_S)
        waiting = server.submit(act_request(2.0, 2), peer="test")
        server.stop()
        with pytest.raises(MessageError) as caught:
            waiting.result(TIMEOUT_S)
        assert caught.value.code is ErrorCode.SHUTTING_DOWN
        gate.set()
        assert_answers(running.result(TIMEOUT_S), 1, 1.0)  # the chunk in progress is still delivered


def test_the_running_request_is_answered_shutting_down_when_the_window_ends(
    context: zmq.Context[zmq.Socket[bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT, shutdown_timeout_s=0.5))
    with serving(server) as endpoint:
        controller = RawController(context, endpoint)
        running = controller.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        submitted = server.submit(act_request(2.0, 2), peer="test")  # waiting behind it
        server.stop()
        reply = controller.receive()  # the window ends while the policy is still held
        assert isinstance(reply, ErrorReply) and (reply.request_id, reply.code) == (running, ErrorCode.SHUTTING_DOWN)
        assert "still computing it when the 0.5 s shutdown window ended" in reply.message
        with pytest.raises(MessageError) as caught:
            submitted.result(TIMEOUT_S)
        assert caught.value.code is ErrorCode.SHUTTING_DOWN
    assert server.policy_running  # the sockets are closed, the worker still waits on the policy
    gate.set()
    wait_for(lambda: not server.policy_running, TIMEOUT_S, "the late result")
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"request_id={running} obs_id=1 mode=reactive status=late_result_dropped" in m for m in messages)
    assert not any("status=ok" in m for m in messages)
    # The stop is said at once, with what it waits for.
    stopping = "stopping: 1 waiting request(s) answered shutting_down; the one being computed has up to 0.5 s"
    assert stopping in messages


def test_a_client_reading_its_last_reply_late_still_gets_it(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    # With ZMQ_IMMEDIATE (as PolicyClient), libzmq drops a received reply not yet read when the connection closes.
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT))
    with serving(server) as endpoint:
        controller = RawController(context, endpoint, immediate=True)
        first = controller.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        server.stop()
        gate.set()
        assert controller.socket.poll(round(TIMEOUT_S * 1e3))  # the reply has arrived, unread
        time.sleep(0.1)  # a client busy elsewhere for a moment
        assert_answers(controller.receive(SHORT_TIMEOUT_S), first, 1.0)


def test_the_running_future_resolves_once_when_the_window_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.robot_bridge.server")
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    server = PolicyServer(policy, ServerConfig(ENDPOINT, shutdown_timeout_s=0.5))
    with serving(server):
        running = server.submit(act_request(1.0, 1), peer="test")
        assert policy.started.wait(TIMEOUT_S)
        server.stop()
        with pytest.raises(MessageError) as caught:
            running.result(TIMEOUT_S)
        assert caught.value.code is ErrorCode.SHUTTING_DOWN
    gate.set()
    wait_for(lambda: not server.policy_running, TIMEOUT_S, "the late result")
    messages = [r.getMessage() for r in caplog.records]
    assert any("request_id=1 obs_id=1 mode=reactive status=late_result_dropped" in m for m in messages)
    assert not any("status=ok" in m for m in messages)  # the late result never reached the resolved future


def test_a_request_whose_deadline_passes_while_queued_expires_and_is_never_computed(
    context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT))) as endpoint:
        running, impatient = RawController(context, endpoint), RawController(context, endpoint)
        first = running.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        late = impatient.act(2.0, timeout_ms=100)
        impatient.barrier()  # queued
        time.sleep(0.2)  # past its deadline, however slow the machine
        gate.set()
        assert_answers(running.receive(), first, 1.0)
        reply = impatient.receive()
        assert isinstance(reply, ErrorReply)
        assert (reply.request_id, reply.code, reply.field) == (late, ErrorCode.EXPIRED, "timeout_ms")
        assert reply.message.startswith("timeout_ms: expected to start within 100 ms, waited ")
    assert len(policy.queries) == 1


def test_requests_their_senders_gave_up_on_do_not_hold_places(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    gate = threading.Event()
    policy = StubPolicy(gate=gate)
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT, max_pending=2))) as endpoint:
        running = RawController(context, endpoint)
        first = running.act(1.0)
        assert policy.started.wait(TIMEOUT_S)
        for level in (2.0, 3.0):  # fire and forget, then gone
            gone = RawController(context, endpoint)
            gone.act(level, timeout_ms=100)
            gone.barrier()
            gone.socket.close()
        time.sleep(0.2)  # past their deadlines
        live = RawController(context, endpoint)
        second = live.act(4.0)
        live.barrier()  # taken in, not refused as overloaded
        gate.set()
        assert_answers(running.receive(), first, 1.0)
        assert_answers(live.receive(), second, 4.0)
    assert [float(query.observation.proprio[0]) for query in policy.queries] == [1.0, 4.0]


def test_curve_admits_listed_clients_only() -> None:
    server_keys, client_keys, stranger_keys = (CurveKeyPair(*zmq.curve_keypair()) for _ in range(3))
    curve = ServerCurve(server_keys, frozenset({client_keys.public}))
    with serving(PolicyServer(StubPolicy(), ServerConfig(ENDPOINT, curve=curve))) as endpoint:
        known = PolicyClient(
            endpoint, timeout_s=TIMEOUT_S, server_public_key=server_keys.public, client_keys=client_keys
        )
        with known:
            reply = known.act(observation(2.0), INSTRUCTION, obs_id=1, capture_time_ns=1)
            np.testing.assert_allclose(reply.actions, expected_actions(observation(2.0).proprio))
        stranger = PolicyClient(
            endpoint, timeout_s=SHORT_TIMEOUT_S, server_public_key=server_keys.public, client_keys=stranger_keys
        )
        for client in (stranger, PolicyClient(endpoint, timeout_s=SHORT_TIMEOUT_S)):
            with client, pytest.raises(RequestTimeout):
                client.ping()


def test_refused_curve_keys_are_logged_a_few_times_a_minute_whatever_a_peer_sends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listed = CurveKeyPair(*zmq.curve_keypair()).public
    allowlist = curve_module._Allowlist(frozenset({listed}))
    with caplog.at_level(logging.WARNING, logger=curve_module.__name__):
        assert not any(allowlist.callback("global", CurveKeyPair(*zmq.curve_keypair()).public) for _ in range(30))
    assert allowlist.callback("global", listed)
    assert len([record for record in caplog.records if "unlisted key" in record.getMessage()]) == 5


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://127.0.0.2:*", True),
        ("tcp://localhost:5555", True),
        ("tcp://[::1]:5555", True),
        ("ipc:///tmp/policy.sock", True),
        ("inproc://policy", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://*:5555", False),
        ("tcp://192.168.1.20:5555", False),
        ("tcp://eth0:5555", False),
    ],
)
def test_is_local_endpoint(endpoint: str, local: bool) -> None:
    assert is_local_endpoint(endpoint) is local


def test_binding_beyond_loopback_needs_keys_or_an_explicit_opt_in() -> None:
    with pytest.raises(ConfigError, match="reachable from other machines"):
        ServerConfig("tcp://0.0.0.0:5555")
    ServerConfig("tcp://0.0.0.0:5555", insecure_bind_all=True)
    keys = CurveKeyPair(*zmq.curve_keypair())
    ServerConfig("tcp://*:5555", curve=ServerCurve(keys, frozenset({CurveKeyPair(*zmq.curve_keypair()).public})))
    with pytest.raises(ConfigError, match="expected tcp://"):
        ServerConfig("udp://127.0.0.1:5555")


def test_server_construction_is_checked() -> None:
    with pytest.raises(ConfigError, match="default_mode: 'reactive' has no policy"):
        PolicyServer({"planning": StubPolicy()})
    with pytest.raises(ConfigError, match="platform 'libero' != 'aloha'"):
        PolicyServer({"reactive": StubPolicy(), "planning": StubPolicy(platform=platform_spec("libero"))})
    with pytest.raises(ConfigError, match=r"joint_limits: expected 14 \(lower, upper\) pairs, got 1"):
        PolicyServer(StubPolicy(), ServerConfig(joint_limits=((0.0, 1.0),)))
    with pytest.raises(ConfigError, match="max_pending"):
        ServerConfig(max_pending=0)


def test_joint_limits_reach_the_metadata() -> None:
    limits = tuple((-1.0 - i, 1.0 + i) for i in range(14))
    server = PolicyServer(StubPolicy(), ServerConfig(ENDPOINT, joint_limits=limits))
    with serving(server) as endpoint, PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        assert client.metadata().joint_limits == limits


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://localhost:99999", "tcp://127.0.0.1:-1", "tcp://127.0.0.1", "tcp://[::1:5555", "tcp://::1:5555"],
)
def test_tcp_ports_out_of_range_and_ipv6_addresses_without_brackets_are_refused(endpoint: str) -> None:
    # libzmq would take 99999 modulo 65536 and quietly bind another port.
    with pytest.raises(ConfigError, match=r"endpoint: expected tcp://HOST:PORT with a port in 0\.\.65535 or '\*'"):
        ServerConfig(endpoint)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
def test_a_server_serves_on_ipv6_loopback(policy: StubPolicy) -> None:
    with serving(PolicyServer(policy, ServerConfig("tcp://[::1]:*"))) as endpoint:
        assert endpoint.startswith("tcp://[::1]:")
        with PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
            assert_answers(client.act(observation(1.0), INSTRUCTION, obs_id=1, capture_time_ns=1), 1, 1.0)


def test_binding_errors_name_the_endpoint(tmp_path: Path) -> None:
    taken = BoundRouter.bind(ServerConfig(ENDPOINT))
    in_use = f"endpoint: cannot bind '{taken.endpoint}': Address already in use; another process is serving on it"
    with taken, pytest.raises(ConfigError, match=in_use):
        BoundRouter.bind(ServerConfig(taken.endpoint))
    missing = f"ipc://{tmp_path}/no/such/dir/policy.sock"
    with pytest.raises(ConfigError, match="No such file or directory; the directory of an ipc:// path must exist"):
        BoundRouter.bind(ServerConfig(missing))


@pytest.fixture
def ipc_dir() -> Iterator[Path]:
    """A short directory for socket files: pytest's tmp_path can pass the 107-byte limit of a socket path."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def test_a_served_ipc_path_is_refused_and_the_server_keeps_it(ipc_dir: Path) -> None:
    endpoint = f"ipc://{ipc_dir}/policy.sock"
    in_use = f"endpoint: cannot bind '{endpoint}': Address already in use; another process is serving on it"
    with serving(PolicyServer(StubPolicy(), ServerConfig(endpoint))) as served:
        with pytest.raises(ConfigError, match=in_use):
            BoundRouter.bind(ServerConfig(endpoint))  # libzmq alone would replace the socket file
        with PolicyClient(served, timeout_s=TIMEOUT_S) as client:
            assert client.ping()  # still reachable


def test_an_ipc_socket_file_is_removed_on_close_and_a_stale_one_is_bound_over(ipc_dir: Path) -> None:
    path = ipc_dir / "policy.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # what a killed server leaves: a file nobody listens on
        dead.bind(str(path))
    with BoundRouter.bind(ServerConfig(f"ipc://{path}")):
        assert path.is_socket()
    assert not path.exists()


def test_an_ipc_path_naming_a_file_is_refused_and_the_file_kept(ipc_dir: Path) -> None:
    notes = ipc_dir / "notes.txt"
    notes.write_text("important")
    with pytest.raises(ConfigError, match=f"endpoint: 'ipc://{notes}' names {notes}, which is not a socket"):
        BoundRouter.bind(ServerConfig(f"ipc://{notes}"))
    assert notes.read_text() == "important"


def test_an_act_sent_before_serving_began_is_refused_as_overloaded_and_never_computed(
    context: zmq.Context[zmq.Socket[bytes]], policy: StubPolicy
) -> None:
    # `serve` binds its socket before loading the models (minutes): a request sent meanwhile may have been given up.
    router = BoundRouter.bind(ServerConfig(ENDPOINT))
    early = RawController(context, router.endpoint)
    early_id = early.act(1.0)
    assert router.socket.poll(round(TIMEOUT_S * 1e3), zmq.POLLIN), "the early act never reached the router"
    with serving(PolicyServer(policy, ServerConfig(ENDPOINT), router=router)):
        refused = early.receive()
        assert isinstance(refused, ErrorReply) and refused.request_id == early_id, refused
        assert refused.code is ErrorCode.OVERLOADED and "arrived while the server was starting" in refused.message
        assert policy.queries == []
        later_id = early.act(2.0)
        assert_answers(early.receive(), later_id, 2.0)


def test_an_act_submitted_before_serving_began_is_refused_as_overloaded(policy: StubPolicy) -> None:
    # The HTTP endpoint's listener is bound before the models load too: what it submits meanwhile is not computed.
    server = PolicyServer(policy, ServerConfig(ENDPOINT))
    request = ActRequest(3, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, **vars(observation(1.0)))
    with pytest.raises(MessageError, match="arrived while the server was starting") as refused:
        server.submit(request, peer="http")
    assert refused.value.code is ErrorCode.OVERLOADED
    with serving(server):
        reply = server.submit(request, peer="http").result(timeout=TIMEOUT_S)
    assert reply.request_id == 3 and len(policy.queries) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death it reports
def test_serving_in_a_thread_fails_at_once_when_the_server_dies_before_serving(
    policy: StubPolicy, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = PolicyServer(policy, ServerConfig(ENDPOINT))

    def dies() -> None:
        raise RuntimeError("the socket went away")

    monkeypatch.setattr(server, "serve_forever", dies)
    # The message of the liveness check, not the start timeout's ("did not begin serving within 30 s").
    with pytest.raises(EngineError, match="stopped before it began serving"), serving(server):
        pass
    server.close()


def test_a_server_takes_over_a_router_bound_before_it() -> None:
    router = BoundRouter.bind(ServerConfig(ENDPOINT))
    server = PolicyServer(StubPolicy(), ServerConfig(ENDPOINT), router=router)
    assert server.endpoint == router.endpoint
    with serving(server) as endpoint, PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        assert endpoint == router.endpoint
        assert client.ping()
    with BoundRouter.bind(ServerConfig(router.endpoint)):  # closed with the server: the port is free again
        pass


def test_a_worker_thread_that_cannot_start_leaves_the_server_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    server = PolicyServer(StubPolicy(), ServerConfig(ENDPOINT))
    start = threading.Thread.start

    def refuse_the_worker(thread: threading.Thread) -> None:
        if thread.name == "policy-worker":
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refuse_the_worker)
    server.start()
    with pytest.raises(RuntimeError, match="can't start new thread"):
        server.serve_forever()
    assert not server.serving
    BoundRouter.bind(ServerConfig(server.endpoint)).close()  # its port was given back
