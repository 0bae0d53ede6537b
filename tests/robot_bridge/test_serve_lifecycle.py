"""The served process's lifecycle: SIGTERM answers the request in flight exactly once and exits within the shutdown
window; `serve` checks its settings and binds its sockets before it loads any policy."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from pathlib import Path

import pytest
import zmq

from cosmos_edge.cli.main import main
from cosmos_edge.cli.serve_cmd import add_serve_parser
from cosmos_edge.cli.signals import sigterm_interrupts
from cosmos_edge.robot_bridge.client import PolicyClient, RemoteError
from cosmos_edge.robot_bridge.http_server import HttpConfig
from cosmos_edge.robot_bridge.protocol import ActReply, ActRequest, ErrorCode, ErrorReply, Reply, decode_reply
from cosmos_edge.runtime.bundle.loader import LoadedPolicies
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, Policy
from tests.helpers.bridge_doubles import (
    INSTRUCTION,
    STARTUP_S,
    Flag,
    StubPolicy,
    expected_actions,
    free_port,
    observation,
    serve_stub,
    wait_until_serving,
)

MARGIN_S = 20.0  # beyond the shutdown window: a loaded 2-core machine, the 0.5 s grace after the last reply, the flush
SPAWN = multiprocessing.get_context("spawn")


@contextmanager
def stub_server(delay_s: float, shutdown_timeout_s: float) -> Iterator[tuple[str, multiprocessing.Process, Event]]:
    """A `serve_stub` process whose policy takes `delay_s`; yields (endpoint, process, the inference-started event)."""
    started = SPAWN.Event()
    kwargs = {"delay_s": delay_s, "started": started, "shutdown_timeout_s": shutdown_timeout_s}
    with spawned_server(serve_stub, **kwargs) as (endpoint, process):
        yield endpoint, process, started


@contextmanager
def spawned_server(target: Callable[..., None], **kwargs: object) -> Iterator[tuple[str, multiprocessing.Process]]:
    """A process running `target(endpoint, **kwargs)`, once it answers a ping; yields (endpoint, process)."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    process = SPAWN.Process(target=target, args=(endpoint,), kwargs=kwargs, daemon=True)
    process.start()
    try:
        with PolicyClient(endpoint, timeout_s=1.0) as client:
            wait_until_serving(client)
        yield endpoint, process
    finally:
        if process.is_alive():
            process.kill()
            process.join()


def act_then_sigterm(
    endpoint: str, process: multiprocessing.Process, started: Event
) -> tuple[Reply, zmq.Socket[bytes]]:
    """Sends an `act`, SIGTERMs the server once its inference runs, and returns the first reply and the socket."""
    controller = act_in_flight(endpoint, started)
    process.terminate()
    assert controller.poll(round((STARTUP_S + MARGIN_S) * 1e3)), "no reply to the request in flight"
    return decode_reply(controller.recv_multipart()), controller


def assert_exits_cleanly_with_no_second_reply(process: multiprocessing.Process, controller: zmq.Socket[bytes]) -> None:
    process.join(MARGIN_S)
    assert process.exitcode == 0  # None: still running; negative: killed by a signal (an abort is -6)
    assert not controller.poll(0), "a second reply"
    controller.close()


def test_sigterm_delivers_the_chunk_being_inferred() -> None:
    with stub_server(delay_s=1.0, shutdown_timeout_s=MARGIN_S) as (endpoint, process, started):
        reply, controller = act_then_sigterm(endpoint, process, started)
        assert isinstance(reply, ActReply) and reply.request_id == 7
        assert (reply.actions == expected_actions(observation(1.0).proprio)).all()
        assert_exits_cleanly_with_no_second_reply(process, controller)


def test_sigterm_answers_an_inference_longer_than_the_window_and_exits() -> None:
    with stub_server(delay_s=600.0, shutdown_timeout_s=1.0) as (endpoint, process, started):
        reply, controller = act_then_sigterm(endpoint, process, started)
        assert isinstance(reply, ErrorReply) and (reply.request_id, reply.code) == (7, ErrorCode.SHUTTING_DOWN)
        assert "still computing it when the 1.0 s shutdown window ended" in reply.message
        assert_exits_cleanly_with_no_second_reply(process, controller)  # not after the 600 s inference


def test_sigterm_winds_both_endpoints_down_at_once_and_answers_a_stalled_http_client() -> None:
    started, port = SPAWN.Event(), free_port()
    http = HttpConfig(port=port, shutdown_timeout_s=5.0)
    kwargs = {"http": http, "delay_s": 600.0, "started": started, "shutdown_timeout_s": 5.0}
    with spawned_server(serve_stub, **kwargs) as (endpoint, process):
        stalled = socket.create_connection(("127.0.0.1", port), timeout=STARTUP_S + MARGIN_S)
        head = b"POST /act HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        stalled.sendall(head + b'{"proprio":')  # and no more: its body never completes
        controller = act_in_flight(endpoint, started)
        process.terminate()
        # The HTTP endpoint stops accepting while the ZeroMQ request in flight still waits out its window: the two
        # windows run together, not one after the other.
        while not refused(port):
            assert not controller.poll(10), "the http endpoint was still accepting after the zeromq drain ended"
        reply = decode_reply(controller.recv_multipart())
        assert isinstance(reply, ErrorReply) and (reply.request_id, reply.code) == (7, ErrorCode.SHUTTING_DOWN)
        response = read_until_closed(stalled)
        status, _, body = response.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 503"), response  # the refusal in the endpoint's JSON form, not a bare 500
        assert json.loads(body) == {
            "error": "body: the server shut down before the body arrived",
            "field": "body",
            "code": "shutting_down",
        }
        assert_exits_cleanly_with_no_second_reply(process, controller)


def act_in_flight(endpoint: str, started: Event) -> zmq.Socket[bytes]:
    """A DEALER whose `act` (request id 7) the server is computing."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    controller = context.socket(zmq.DEALER)
    controller.setsockopt(zmq.LINGER, 0)
    controller.setsockopt(zmq.IMMEDIATE, 1)  # as PolicyClient: an unread reply is lost if the server closes too early
    controller.connect(endpoint)
    request = ActRequest(7, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, **vars(observation(1.0)))
    controller.send_multipart(request.to_frames(), copy=False)
    assert started.wait(STARTUP_S)
    return controller


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=STARTUP_S).close()
    except ConnectionRefusedError:
        return True
    return False


def read_until_closed(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    connection.close()
    return b"".join(chunks)


# --- serve: settings and sockets before the policies ---------------------------------------------------------------


class RecordingFactory:
    def __init__(self) -> None:
        self.called = False

    def __call__(self, args: argparse.Namespace) -> LoadedPolicies:
        self.called = True
        raise AssertionError("loaded the policies of a server that cannot start")


def serve_args(*argv: str) -> tuple[argparse.Namespace, RecordingFactory]:
    factory = RecordingFactory()
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), factory)
    return parser.parse_args(["serve", *argv]), factory


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture
def ipc_path_in_use() -> Iterator[str]:
    """A socket path a server listens on (in a short directory: a socket path has at most 107 bytes)."""
    with tempfile.TemporaryDirectory() as directory, socket.socket(socket.AF_UNIX) as taken:
        taken.bind(f"{directory}/policy.sock")
        taken.listen()
        yield taken.getsockname()


def refusals(port: int, ipc_path: str, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """argv → the start of the one-line error."""
    return {
        "port in use": (["--endpoint", f"tcp://127.0.0.1:{port}"], "--endpoint: cannot bind 'tcp://127.0.0.1:"),
        "ipc path in use": (
            ["--endpoint", f"ipc://{ipc_path}"],
            f"--endpoint: cannot bind 'ipc://{ipc_path}': Address already in use; another process is serving on it",
        ),
        "no ipc directory": (
            ["--endpoint", f"ipc://{tmp_path}/nonexistent/dir/sock"],
            f"--endpoint: cannot bind 'ipc://{tmp_path}/nonexistent/dir/sock': No such file or directory",
        ),
        "port out of range": (
            ["--endpoint", "tcp://localhost:99999"],
            "--endpoint: expected tcp://HOST:PORT with a port in 0..65535 or '*'",
        ),
        "non-positive shutdown window": (
            ["--shutdown-timeout-s", "0"],
            "--shutdown-timeout-s: expected seconds in (0, 3600], got 0.0",
        ),
        "endless shutdown window": (
            ["--shutdown-timeout-s", "inf"],
            "--shutdown-timeout-s: expected seconds in (0, 3600], got inf",
        ),
    }


CASES = [
    "port in use",
    "ipc path in use",
    "no ipc directory",
    "port out of range",
    "non-positive shutdown window",
    "endless shutdown window",
]


@pytest.mark.parametrize("case", CASES)
def test_serve_refuses_bad_settings_before_loading_a_policy(
    case: str, port_in_use: int, ipc_path_in_use: str, tmp_path: Path
) -> None:
    argv, message = refusals(port_in_use, ipc_path_in_use, tmp_path)[case]
    args, factory = serve_args(*argv)
    with pytest.raises(ConfigError) as caught:
        args.func(args)
    assert str(caught.value).startswith(message), str(caught.value)
    assert not factory.called


def test_serve_refuses_an_http_port_in_use_before_loading_and_frees_the_zeromq_one(port_in_use: int) -> None:
    pytest.importorskip("cosmos_edge.robot_bridge.http_server")  # needs the http extra
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args, factory = serve_args("--endpoint", endpoint, "--http", f"127.0.0.1:{port_in_use}")
    with pytest.raises(ConfigError, match=f"--http: cannot listen on 127.0.0.1:{port_in_use}"):
        args.func(args)
    assert not factory.called
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    with context.socket(zmq.ROUTER) as router:
        router.bind(endpoint)  # the ZeroMQ endpoint, bound first, was released


@pytest.mark.parametrize("case", ["port in use", "ipc path in use", "no ipc directory"])
def test_the_command_prints_one_line_naming_the_flag(
    case: str, port_in_use: int, ipc_path_in_use: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, message = refusals(port_in_use, ipc_path_in_use, tmp_path)[case]
    assert main(["serve", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"cosmos-edge: error: {message}"), lines


class FakeLoaded:
    """What `make_policies` returns, recording whether the policies were released (in `closed`, and in `released`
    for a test in another process)."""

    planning = None  # a reactive server

    def __init__(self, policy: StubPolicy, released: Flag | None = None) -> None:
        self.policy = policy
        self.closed = False
        self._released = released

    def modes(self) -> dict[str, Policy]:
        return {"reactive": self.policy}

    def __enter__(self) -> FakeLoaded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True
        if self._released is not None:
            self._released.set()


def serve_until_sigterm(policy: StubPolicy, *argv: str) -> tuple[int, FakeLoaded, ErrorReply | ActReply]:
    """Runs `serve` on this (the main) thread with `policy`; another thread acts once, then sends SIGTERM."""
    loaded = FakeLoaded(policy)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), lambda args: loaded)  # type: ignore[arg-type,return-value]
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    args = parser.parse_args(["serve", "--endpoint", endpoint, *argv])
    replies: list[ErrorReply | ActReply] = []

    def controller() -> None:
        with PolicyClient(endpoint, timeout_s=1.0) as probe:
            wait_until_serving(probe)
        acting = threading.Thread(target=lambda: replies.append(act_or_error(endpoint)), daemon=True)
        acting.start()
        assert policy.started.wait(STARTUP_S)
        os.kill(os.getpid(), signal.SIGTERM)  # handled on the main thread, by `serve`'s handler
        acting.join(STARTUP_S + MARGIN_S)

    thread = threading.Thread(target=controller, daemon=True)
    thread.start()
    code = args.func(args)
    thread.join(STARTUP_S + MARGIN_S)
    return code, loaded, replies[0]


def act_or_error(endpoint: str) -> ErrorReply | ActReply:
    with PolicyClient(endpoint, timeout_s=STARTUP_S + MARGIN_S) as client:
        try:
            return client.act(observation(), INSTRUCTION, obs_id=1, capture_time_ns=1)
        except RemoteError as error:
            return ErrorReply(0, error.code, error.field, error.detail)


def test_serve_delivers_the_chunk_on_sigterm_then_releases_the_policies() -> None:
    code, loaded, reply = serve_until_sigterm(StubPolicy(delay_s=0.5))
    assert code == 0 and isinstance(reply, ActReply)
    assert loaded.closed


def serve_while_loading_forever(port: int, *, loading: Flag, http_port: int | None = None) -> None:
    """Target of a spawned process: `serve` whose policies never finish loading; exits as the CLI does on Ctrl-C."""

    def load(args: argparse.Namespace) -> LoadedPolicies:
        loading.set()
        threading.Event().wait()
        raise AssertionError("unreachable")

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), load)
    http = [] if http_port is None else ["--http", f"127.0.0.1:{http_port}"]
    args = parser.parse_args(["serve", "--endpoint", f"tcp://127.0.0.1:{port}", *http])
    try:
        with sigterm_interrupts():  # as `main` runs every command
            args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def test_sigterm_while_the_models_load_interrupts_and_frees_the_port() -> None:
    loading, port, http_port = SPAWN.Event(), free_port(), free_port()
    kwargs = {"loading": loading, "http_port": http_port}
    process = SPAWN.Process(target=serve_while_loading_forever, args=(port,), kwargs=kwargs, daemon=True)
    process.start()
    try:
        assert loading.wait(STARTUP_S)  # the port is bound by now: serve binds before it loads
        # HTTP connections are refused until serving begins, rather than queued to be computed minutes late.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", http_port), timeout=STARTUP_S).close()
        process.terminate()
        process.join(MARGIN_S)
        assert process.exitcode == 130  # interrupted as by Ctrl-C, not killed by the signal (-15)
        for released in (port, http_port):  # released on the way out
            with socket.socket() as again:
                again.bind(("127.0.0.1", released))
    finally:
        if process.is_alive():
            process.kill()


class PooledPolicy(StubPolicy):
    """A policy whose call runs on a thread pool, as the planning policy's candidates do, and never returns: the
    interpreter joins a pool's threads when it exits normally."""

    def __init__(self, started: Flag) -> None:
        super().__init__(started=started)
        self._pool = ThreadPoolExecutor(max_workers=1)

    def infer(self, query: ActionQuery) -> ChunkResult:
        self.started.set()
        return self._pool.submit(self._never).result()

    @staticmethod
    def _never() -> ChunkResult:
        threading.Event().wait()
        raise AssertionError("unreachable")


def serve_a_call_that_never_returns(
    endpoint: str, *, started: Flag, released: Flag, shutdown_timeout_s: float = 0.5
) -> None:
    """Target of a spawned process: `serve` with a `PooledPolicy` and a shutdown window, then a normal exit."""
    loaded = FakeLoaded(PooledPolicy(started), released)
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), lambda args: loaded)  # type: ignore[arg-type,return-value]
    args = parser.parse_args(["serve", "--endpoint", endpoint, "--shutdown-timeout-s", str(shutdown_timeout_s)])
    args.func(args)


def test_serve_exits_while_a_call_outlives_the_window_and_keeps_its_policies() -> None:
    started, released = SPAWN.Event(), SPAWN.Event()
    with spawned_server(serve_a_call_that_never_returns, started=started, released=released) as (endpoint, process):
        reply, controller = act_then_sigterm(endpoint, process, started)
        assert isinstance(reply, ErrorReply) and (reply.request_id, reply.code) == (7, ErrorCode.SHUTTING_DOWN)
        assert_exits_cleanly_with_no_second_reply(process, controller)  # with the call still blocked in its pool
        assert not released.is_set()  # released by the process exit, not under the running call


def test_a_second_sigterm_ends_the_shutdown_window_at_once() -> None:
    started, released = SPAWN.Event(), SPAWN.Event()
    kwargs = {"started": started, "released": released, "shutdown_timeout_s": 60.0}
    with spawned_server(serve_a_call_that_never_returns, **kwargs) as (endpoint, process):
        controller = act_in_flight(endpoint, started)
        process.terminate()
        assert not controller.poll(500)  # the first: the call in flight has up to 60 s
        process.terminate()  # the operator's second Ctrl-C
        assert controller.poll(round(MARGIN_S * 1e3)), "no reply after the second signal (well within the 60 s)"
        reply = decode_reply(controller.recv_multipart())
        assert isinstance(reply, ErrorReply) and (reply.request_id, reply.code) == (7, ErrorCode.SHUTTING_DOWN)
        assert "when a second stop ended the 60.0 s shutdown window" in reply.message
        assert_exits_cleanly_with_no_second_reply(process, controller)
