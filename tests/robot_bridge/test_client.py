"""Policy client: deadlines, socket reset after a timeout, stale replies, and a server killed and restarted."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import zmq

from cosmos_edge.robot_bridge import client as client_module
from cosmos_edge.robot_bridge.client import (
    ConnectionLost,
    PolicyClient,
    RemoteError,
    RequestCancelled,
    RequestTimeout,
)
from cosmos_edge.robot_bridge.curve import CurveKeyPair
from cosmos_edge.robot_bridge.protocol import (
    ActReply,
    ActRequest,
    ErrorCode,
    ErrorReply,
    MessageError,
    Pong,
    decode_request,
)
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import Observation
from tests.helpers.bridge_doubles import (
    INSTRUCTION,
    expected_actions,
    free_port,
    observation,
    serve_stub,
    wait_until_serving,
)

TIMEOUT_S = 5.0
SHORT_TIMEOUT_S = 0.3

Handler = Callable[[zmq.Socket[bytes]], None]


@contextmanager
def fake_server(handler: Handler) -> Iterator[str]:
    """A bare ROUTER socket on a free port, driven by `handler` in a thread."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("tcp://127.0.0.1:*")
    thread = threading.Thread(target=handler, args=(router,), daemon=True)
    thread.start()
    try:
        yield router.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        thread.join(TIMEOUT_S)
        router.close()
        context.term()


def receive(router: zmq.Socket[bytes]) -> tuple[bytes, int]:
    assert router.poll(round(TIMEOUT_S * 1e3)), "the client sent nothing"
    identity, *frames = router.recv_multipart()
    return identity, decode_request(frames).request_id


def test_stale_replies_are_discarded() -> None:
    def handler(router: zmq.Socket[bytes]) -> None:
        identity, first_id = receive(router)
        router.send_multipart([identity, *Pong(first_id, 1, "first").to_frames()])
        identity, second_id = receive(router)
        for stale in (Pong(first_id, 1, "first again"), ErrorReply(0, ErrorCode.MALFORMED, "", "unreadable")):
            router.send_multipart([identity, *stale.to_frames()])
        router.send_multipart([identity, *Pong(second_id, 2, "second").to_frames()])

    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        assert client.ping().server_version == "first"
        assert client.ping().server_version == "second"


def test_a_timeout_resets_the_socket_so_a_late_reply_is_never_taken_for_a_new_one() -> None:
    identities: list[bytes] = []

    def handler(router: zmq.Socket[bytes]) -> None:
        first, first_id = receive(router)  # not answered in time
        second, second_id = receive(router)
        router.send_multipart([first, *Pong(first_id, 1, "late").to_frames()])
        router.send_multipart([second, *Pong(second_id, 2, "fresh").to_frames()])
        identities.extend((first, second))

    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=SHORT_TIMEOUT_S) as client:
        with pytest.raises(RequestTimeout, match=f"no reply to request 1 .* within {SHORT_TIMEOUT_S} s"):
            client.ping()
        assert client.ping().server_version == "fresh"
    assert identities[0] != identities[1]  # a new socket, so the late reply went nowhere


def test_closing_the_client_cancels_the_call_waiting_for_its_reply() -> None:
    received = threading.Event()

    def handler(router: zmq.Socket[bytes]) -> None:
        receive(router)  # never answered
        received.set()

    outcomes: list[BaseException] = []

    def call(client: PolicyClient) -> None:
        try:
            client.ping()
        except BaseException as error:
            outcomes.append(error)

    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=600.0) as client:
        caller = threading.Thread(target=call, args=(client,))
        caller.start()
        assert received.wait(TIMEOUT_S)
        client.close()  # a controller shutting down: the call gives way instead of waiting its 600 s
        caller.join()
    assert len(outcomes) == 1 and isinstance(outcomes[0], RequestCancelled), outcomes
    assert "cancelled" in str(outcomes[0]) and endpoint in str(outcomes[0])


def test_a_server_gone_mid_request_is_said_at_once_not_at_the_timeout() -> None:
    def handler(router: zmq.Socket[bytes]) -> None:
        receive(router)
        router.close()  # a server killed while computing: its connections close, no reply will come

    # Unnoticed, the call would end in RequestTimeout at its deadline instead.
    lost = r"the connection to tcp://\S+ closed before request 1 was answered"
    with (
        fake_server(handler) as endpoint,
        PolicyClient(endpoint, timeout_s=30.0) as client,
        pytest.raises(ConnectionLost, match=lost),
    ):
        client.ping()


def test_a_reply_of_the_wrong_kind_is_a_protocol_error() -> None:
    def handler(router: zmq.Socket[bytes]) -> None:
        identity, request_id = receive(router)
        router.send_multipart([identity, *Pong(request_id, 1, "confused").to_frames()])

    with (
        fake_server(handler) as endpoint,
        PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client,
        pytest.raises(MessageError, match="expected metadata_result, got pong"),
    ):
        client.metadata()


def test_error_replies_raise_remote_error() -> None:
    def handler(router: zmq.Socket[bytes]) -> None:
        identity, request_id = receive(router)
        error = ErrorReply(request_id, ErrorCode.SUPERSEDED, "obs_id", "obs_id: observation 1 replaced by 2")
        router.send_multipart([identity, *error.to_frames()])

    with (
        fake_server(handler) as endpoint,
        PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client,
        pytest.raises(RemoteError) as caught,
    ):
        client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
    assert (caught.value.code, caught.value.field) == (ErrorCode.SUPERSEDED, "obs_id")
    assert str(caught.value) == "server error superseded: obs_id: observation 1 replaced by 2"


def act_reply(request_id: int) -> ActReply:
    actions = np.zeros((50, 14), np.float32)
    return ActReply(request_id, 1, actions, 0.5, "reactive", {}, "fake", server_receive_ns=1, server_send_ns=2)


def test_overloaded_is_retried_with_the_deadline_that_is_left() -> None:
    deadlines: list[int | None] = []
    request_ids: list[int] = []

    def handler(router: zmq.Socket[bytes]) -> None:
        for attempt in range(3):
            assert router.poll(round(TIMEOUT_S * 1e3)), "the client did not retry"
            identity, *frames = router.recv_multipart()
            request = decode_request(frames)
            assert isinstance(request, ActRequest)
            deadlines.append(request.timeout_ms)
            request_ids.append(request.request_id)
            refused = ErrorReply(request.request_id, ErrorCode.OVERLOADED, "", "2 controllers are already waiting")
            reply = act_reply(request.request_id) if attempt == 2 else refused
            router.send_multipart([identity, *reply.to_frames()])

    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        reply = client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
    assert reply.value == 0.5
    assert len(set(request_ids)) == 3  # each attempt is a request of its own
    assert all(isinstance(ms, int) for ms in deadlines)
    assert TIMEOUT_S * 1e3 >= deadlines[0] >= deadlines[1] >= deadlines[2] >= 1  # what is left of the one deadline


def test_a_request_sent_once_the_server_appears_carries_what_is_left_of_its_deadline() -> None:
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    late_s = 1.0
    sent_ms: list[int | None] = []
    answered = threading.Event()  # the socket stays open until the reply is read: closing would drop it

    def serve_late() -> None:
        time.sleep(late_s)  # the client waits for a connection meanwhile
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(endpoint)
        try:
            assert router.poll(round(TIMEOUT_S * 1e3)), "the client sent nothing"
            identity, *frames = router.recv_multipart()
            request = decode_request(frames)
            assert isinstance(request, ActRequest)
            sent_ms.append(request.timeout_ms)
            router.send_multipart([identity, *act_reply(request.request_id).to_frames()])
            answered.wait(TIMEOUT_S)
        finally:
            router.close()
            context.term()

    server = threading.Thread(target=serve_late, daemon=True)
    server.start()
    with PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        assert client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1).value == 0.5
    answered.set()
    server.join(TIMEOUT_S)
    assert sent_ms and sent_ms[0] is not None
    assert sent_ms[0] <= (TIMEOUT_S - late_s / 2) * 1e3  # not the whole timeout: the wait to connect is spent


def test_overloaded_retries_wait_a_random_delay_whose_bound_doubles_up_to_half_a_second(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bounds: list[tuple[float, float]] = []
    monkeypatch.setattr(client_module.random, "uniform", lambda low, high: bounds.append((low, high)) or 0.0)

    def handler(router: zmq.Socket[bytes]) -> None:
        for attempt in range(7):
            identity, request_id = receive(router)
            refused = ErrorReply(request_id, ErrorCode.OVERLOADED, "", "8 controllers are already waiting")
            reply = act_reply(request_id) if attempt == 6 else refused
            router.send_multipart([identity, *reply.to_frames()])

    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
        assert client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1).value == 0.5
    assert bounds == [(0.0, 0.02), (0.0, 0.04), (0.0, 0.08), (0.0, 0.16), (0.0, 0.32), (0.0, 0.5)]


def test_overloaded_until_the_deadline_raises_it() -> None:
    attempts = []
    stop = threading.Event()

    def handler(router: zmq.Socket[bytes]) -> None:
        while not stop.is_set():
            if router.poll(50):
                identity, request_id = receive(router)
                attempts.append(request_id)
                refused = ErrorReply(request_id, ErrorCode.OVERLOADED, "", "8 controllers are already waiting")
                router.send_multipart([identity, *refused.to_frames()])

    # 1 s: room for several attempts however slowly a loaded machine answers each (a retry needs the time of one)
    with fake_server(handler) as endpoint, PolicyClient(endpoint, timeout_s=1.0) as client:
        with pytest.raises(RemoteError) as caught:  # raised once the deadline leaves no time for another attempt
            client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
        stop.set()
    assert caught.value.code is ErrorCode.OVERLOADED
    assert len(attempts) >= 2


def test_other_errors_are_not_retried() -> None:
    attempts = []

    def handler(router: zmq.Socket[bytes]) -> None:
        identity, request_id = receive(router)
        attempts.append(request_id)
        expired = ErrorReply(request_id, ErrorCode.EXPIRED, "timeout_ms", "timeout_ms: expected to start within 5 ms")
        router.send_multipart([identity, *expired.to_frames()])

    with (
        fake_server(handler) as endpoint,
        PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client,
        pytest.raises(RemoteError) as caught,
    ):
        client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
    assert caught.value.code is ErrorCode.EXPIRED and len(attempts) == 1


def test_nobody_listening_times_out_within_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that moves 0.1 s per reading: the client's own 0.3 s deadline ends the call after a few readings, where
    # the default 5 s would take about fifty (no wall-clock bound: the count is the measure).
    readings = itertools.count(1)
    monkeypatch.setattr(time, "monotonic", lambda: 0.1 * next(readings))
    with (
        PolicyClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=SHORT_TIMEOUT_S) as client,
        pytest.raises(RequestTimeout, match=f"within {SHORT_TIMEOUT_S} s") as caught,
    ):
        client.metadata()
    assert isinstance(caught.value, TimeoutError)
    assert next(readings) <= 10


def test_a_server_that_is_down_is_said_within_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same clock: a connection waited for 0.3 s of a call's 100 s (a planning reply may take that long).
    readings = itertools.count(1)
    monkeypatch.setattr(time, "monotonic", lambda: 0.1 * next(readings))
    with (
        PolicyClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=100.0, connect_timeout_s=SHORT_TIMEOUT_S) as client,
        pytest.raises(RequestTimeout, match=rf"no connection to .* within {SHORT_TIMEOUT_S} s") as caught,
    ):
        client.metadata()
    assert isinstance(caught.value, TimeoutError)
    assert next(readings) <= 10


def test_a_malformed_observation_is_refused_before_sending() -> None:
    obs = observation()
    float_image = {**obs.images, "cam_high": obs.images["cam_high"].astype(np.float32)}
    cases: list[tuple[dict[str, np.ndarray], object, str]] = [
        (float_image, obs.proprio, "image/cam_high: expected dtype uint8, got float32"),
        (obs.images, np.array(["0.5"] * 14), "proprio: expected numbers, got dtype <U3"),
        (obs.images, [[1.0], [2.0, 3.0]], "proprio: expected numbers, got list"),
        (obs.images, np.full(14, 1e300), "proprio: expected values within float32's range"),
    ]
    with PolicyClient("tcp://127.0.0.1:9", timeout_s=TIMEOUT_S) as client:  # nobody there: refused, or a timeout
        for images, proprio, message in cases:
            bad = Observation(images=images, proprio=proprio)  # type: ignore[arg-type]
            with pytest.raises(MessageError, match=re.escape(message)):
                client.act(bad, INSTRUCTION, obs_id=1, capture_time_ns=1)


def test_client_configuration_is_checked() -> None:
    for timeout_s in (0, math.nan, math.inf, 1e12, "5", True):
        with pytest.raises(ConfigError, match=re.escape("timeout_s: expected a finite number in (0, 86400]")):
            PolicyClient("tcp://127.0.0.1:5555", timeout_s=timeout_s)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="CURVE needs both"):
        PolicyClient("tcp://127.0.0.1:5555", server_public_key=CurveKeyPair(*zmq.curve_keypair()).public)


# --- across processes ----------------------------------------------------------------------------------------------


def act_and_check(client: PolicyClient, obs_id: int) -> None:
    reply = client.act(observation(float(obs_id)), INSTRUCTION, obs_id=obs_id, capture_time_ns=time.time_ns())
    assert reply.obs_id == obs_id
    np.testing.assert_allclose(reply.actions, expected_actions(observation(float(obs_id)).proprio))


def test_a_server_killed_mid_stream_then_restarted_is_reached_again() -> None:
    spawn = multiprocessing.get_context("spawn")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = spawn.Process(target=serve_stub, args=(endpoint,), daemon=True)
    first.start()
    second = spawn.Process(target=serve_stub, args=(endpoint,), daemon=True)
    try:
        with PolicyClient(endpoint, timeout_s=1.0) as client:
            wait_until_serving(client)
            for obs_id in range(3):
                act_and_check(client, obs_id)
            first.kill()
            first.join(TIMEOUT_S)
            with pytest.raises(RequestTimeout):
                act_and_check(client, 3)
            second.start()
            wait_until_serving(client)
            act_and_check(client, 4)
        second.terminate()  # SIGTERM: the CLI's handler stops the server cleanly
        second.join(TIMEOUT_S)
        assert second.exitcode == 0
    finally:
        for process in (first, second):
            if process.is_alive():
                process.kill()


def test_a_peer_that_drops_every_connection_times_out_and_never_wedges_the_client() -> None:
    # An HTTP port or a CURVE server for a plain client: every connection dropped at once. Reconnecting each
    # millisecond makes thousands of connection events within the call; in a process of its own, which a wedged
    # libzmq could not leave.
    code = """
import socket, threading, time, zmq
from cosmos_edge.robot_bridge.client import PolicyClient, RequestTimeout
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(128)
def drop_all():
    while True:
        listener.accept()[0].close()
threading.Thread(target=drop_all, daemon=True).start()
client = PolicyClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}", timeout_s=4.0)
client._context = zmq.Context()
client._context.setsockopt(zmq.RECONNECT_IVL, 1)
try:
    client.ping()
except RequestTimeout:
    client.close()
    print("timed out")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "timed out", done.stderr
