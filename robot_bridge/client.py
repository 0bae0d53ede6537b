"""The controller-side client of the policy server.

A DEALER socket with request ids rather than REQ: REQ's strict send/receive alternation wedges forever after one
lost reply (the failure GR00T's client shows). Every call here has a deadline. On a timeout the socket is closed and
a fresh one (a new identity) is made for the next call, so a restarted server is reached again and a late reply to
the old request can never be mistaken for a new one. Replies whose id is not the one awaited are discarded.

An `act` tells the server its deadline (`timeout_ms`), so that the server does not compute a request this client has
given up on, and an `overloaded` answer is retried with exponential backoff while the deadline allows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import random
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from cosmos_edge.robot_bridge.curve import CurveKeyPair, check_key
from cosmos_edge.robot_bridge.endpoints import is_ipv6, parse_endpoint
from cosmos_edge.robot_bridge.protocol import (
    MAX_TIMEOUT_MS,
    ActReply,
    ActRequest,
    ErrorCode,
    ErrorReply,
    MessageError,
    MetadataRequest,
    ModeSet,
    PingRequest,
    Pong,
    Reply,
    Request,
    ServerMetadata,
    SetModeRequest,
    WireLimits,
    decode_reply,
)
from cosmos_edge.robot_bridge.wire import wire_proprio
from cosmos_edge.runtime.checks import check_number
from cosmos_edge.runtime.errors import ConfigError, CosmosEdgeError, ProtocolError
from cosmos_edge.runtime.policy.api import Observation

_LOG = logging.getLogger(__name__)

R = TypeVar("R", ActReply, ServerMetadata, Pong, ModeSet)

_FIRST_RETRY_S = 0.02  # backoff after the first `overloaded`, doubled after each further one
_MAX_RETRY_S = 0.5
_CANCEL_POLL_MS = 50  # how soon a call waiting on the socket notices `close()`
_MAX_TIMEOUT_S = 86400.0  # a longer wait is a mistake; zmq's poll overflows past 2**31 ms (about 25 days)

# `ActReply` and `ServerMetadata` are the protocol's own message types; re-exported as the client's results.
__all__ = [
    "ActReply",
    "ConnectionLost",
    "PolicyClient",
    "RemoteError",
    "RequestCancelled",
    "RequestTimeout",
    "ServerMetadata",
]


class RequestTimeout(CosmosEdgeError, TimeoutError):
    """No reply within the client's timeout. The socket has been reset; the next call reconnects."""


class ConnectionLost(CosmosEdgeError, ConnectionError):
    """The connection closed while a call waited for its reply (the server stopped, crashed or restarted): the reply
    will not come. The socket has been reset; the next call reconnects."""


class RequestCancelled(CosmosEdgeError):
    """The client was closed while this call waited (a controller shutting down); nothing more will come of it."""


class RemoteError(CosmosEdgeError):
    """The server answered with an `error` reply."""

    def __init__(self, reply: ErrorReply) -> None:
        super().__init__(f"server error {reply.code.value}: {reply.message}")
        self.code: ErrorCode = reply.code
        self.field = reply.field
        self.detail = reply.message


class PolicyClient:
    """Talks to a `PolicyServer` at `endpoint` (e.g. "tcp://10.0.0.5:5555").

    With CURVE, pass the server's public key and this client's key pair (which the server must list). The socket is
    made on the first call, not here. Calls are serialised by a lock, so one client may be shared between threads;
    a call waits up to `timeout_s` once it holds the lock (a call from another thread first waits for the one in
    progress).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float | None = None,
        server_public_key: bytes | None = None,
        client_keys: CurveKeyPair | None = None,
        limits: WireLimits | None = None,
    ) -> None:
        check_number("timeout_s", timeout_s, 0.0, _MAX_TIMEOUT_S, above_low=True)
        if connect_timeout_s is not None:
            check_number("connect_timeout_s", connect_timeout_s, 0.0, _MAX_TIMEOUT_S, above_low=True)
        if (server_public_key is None) != (client_keys is None):
            raise ConfigError("server_public_key and client_keys: CURVE needs both (the server admits listed keys)")
        if server_public_key is not None:
            check_key("server_public_key", server_public_key)
        self._ipv6 = is_ipv6(parse_endpoint(endpoint, wildcard_port=False))  # refused now, not at the first call
        self._endpoint = endpoint
        self._timeout_s = timeout_s
        # How long a call waits for a connection (within its timeout): a server that is down is said sooner than a
        # slow reply is given up on.
        self._connect_timeout_s = timeout_s if connect_timeout_s is None else min(connect_timeout_s, timeout_s)
        self._server_public_key = server_public_key
        self._client_keys = client_keys
        self._limits = limits or WireLimits()
        self._request_ids = itertools.count(1)  # 0 is what the server answers to a request it could not read
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by `close()`, which the call holding the lock then gives way to
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._monitor: zmq.Socket[bytes] | None = None  # events of `_socket`'s connections, during a call
        self._monitors = itertools.count()  # each call's monitor has an address of its own

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def act(
        self,
        observation: Observation,
        instruction: str,
        *,
        obs_id: int,
        capture_time_ns: int,
        mode: str | None = None,
        seed: int | None = None,
        steps: int | None = None,
        return_all_query_results: bool = False,
        return_actions_by_depth: bool = False,
    ) -> ActReply:
        """Asks for the chunk for `observation`. The images are sent from their own buffers, without a copy: do not
        modify them while this call runs. The reply's `actions` are a read-only view of the received message.
        A planning mode's reply says how the query ended and what each candidate scored;
        `return_all_query_results`: it also carries every candidate's actions and per-depth values; with
        `return_actions_by_depth` too, each candidate's chunk at every depth (a server older than that field refuses
        it, naming it).

        The request carries what is left of this call's deadline, so the server drops it (`expired`) rather than
        compute it after we gave up. `overloaded` answers are retried with backoff while the deadline leaves room for
        the delay and an answer as quick as the last.

        Raises `RequestTimeout`, `RemoteError` (e.g. `superseded`, an unknown instruction, `overloaded` until the
        deadline), `ProtocolError` (a malformed observation, caught before sending: a `MessageError` naming the
        field; or a malformed reply), `ConnectionLost` (the connection closed before the reply came) or
        `RequestCancelled` (`close()` from another thread)."""
        with self._lock:
            deadline = time.monotonic() + self._timeout_s
            request = ActRequest(
                next(self._request_ids),
                obs_id=obs_id,
                capture_time_ns=capture_time_ns,
                instruction=instruction,
                images=observation.images,
                proprio=wire_proprio(observation.proprio),
                mode=mode,
                seed=seed,
                steps=steps,
                planning_summary=True,
                return_all_query_results=return_all_query_results or None,
                return_actions_by_depth=return_actions_by_depth or None,
                timeout_ms=_timeout_ms(deadline),
            )
            return self._act_until(request, deadline)

    def metadata(self) -> ServerMetadata:
        with self._lock:
            return self._call(MetadataRequest(next(self._request_ids)), ServerMetadata, self._deadline())

    def ping(self) -> Pong:
        with self._lock:
            return self._call(PingRequest(next(self._request_ids)), Pong, self._deadline())

    def set_mode(self, mode: str) -> ModeSet:
        """Switches the server's default mode for every controller."""
        with self._lock:
            return self._call(SetModeRequest(next(self._request_ids), mode), ModeSet, self._deadline())

    def close(self) -> None:
        """Closes the socket; a call waiting in another thread raises `RequestCancelled` within
        `_CANCEL_POLL_MS` rather than at its deadline. A later call connects again."""
        self._closing.set()
        with self._lock:
            self._closing.clear()
            self._reset()
            if self._context is not None:
                self._context.term()
                self._context = None

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _act_until(self, request: ActRequest, deadline: float) -> ActReply:
        """Sends `request`, and again after each `overloaded` answer, with a growing delay, while `deadline` allows."""
        backoff_s = _FIRST_RETRY_S
        while True:
            sent = time.monotonic()
            try:
                return self._call(request, ActReply, deadline)
            except RemoteError as error:
                delay_s = random.uniform(0.0, backoff_s)  # full jitter: controllers refused together retry apart
                answered_in_s = time.monotonic() - sent  # an attempt that could not be answered in time is not made
                if error.code is not ErrorCode.OVERLOADED or time.monotonic() + delay_s + answered_in_s >= deadline:
                    raise
            _LOG.debug("server overloaded; retrying obs_id=%s in %.3f s", request.obs_id, delay_s)
            if self._closing.wait(delay_s):
                raise self._cancelled(request)
            backoff_s = min(2 * backoff_s, _MAX_RETRY_S)
            request = dataclasses.replace(request, request_id=next(self._request_ids))  # `_send` renews timeout_ms

    def _deadline(self) -> float:
        return time.monotonic() + self._timeout_s

    def _call(self, request: Request, expected: type[R], deadline: float) -> R:
        socket = self._connected()
        with self._watching(socket):
            try:
                self._send(socket, request, deadline)
                reply = self._await_reply(socket, request, deadline)
            except (RequestTimeout, RequestCancelled, ConnectionLost, ProtocolError):
                self._reset()
                raise
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply)
        if not isinstance(reply, expected):
            self._reset()
            raise MessageError(
                ErrorCode.UNKNOWN_KIND, "kind", f"expected {expected.kind.value}, got {reply.kind.value}"
            )
        return reply

    def _send(self, socket: zmq.Socket[bytes], request: Request, deadline: float) -> None:
        # With IMMEDIATE set, the socket is writable only once a connection (and its CURVE handshake) is up.
        connect_deadline = min(deadline, time.monotonic() + self._connect_timeout_s)
        while self._poll(socket, zmq.POLLOUT, request, connect_deadline):
            if isinstance(request, ActRequest) and request.timeout_ms is not None:  # less is left once connected
                request = dataclasses.replace(request, timeout_ms=_timeout_ms(deadline))
            try:
                socket.send_multipart(request.to_frames(), zmq.NOBLOCK, copy=False)
                return
            except zmq.Again:  # the connection dropped between poll and send: wait for one again
                continue
        if self._client_keys is not None:
            curve = ", and does it admit this client's CURVE key"
        else:  # a CURVE server drops a plain connection without a word
            curve = ", or does it require CURVE keys (the server's public key and a client key pair)"
        sending = _with_article(request.kind.value)
        raise RequestTimeout(
            f"no connection to {self._endpoint} within {self._connect_timeout_s} s (sending {sending} request); "
            f"is the server running, and is this its ZeroMQ endpoint (not its HTTP port){curve}?"
        )

    def _await_reply(self, socket: zmq.Socket[bytes], request: Request, deadline: float) -> Reply:
        while self._poll(socket, zmq.POLLIN, request, deadline):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:  # woken by the connection closing, with no reply read before it
                raise ConnectionLost(
                    f"{request.kind.value}: the connection to {self._endpoint} closed before request "
                    f"{request.request_id} was answered (the server stopped, crashed or restarted; the socket was "
                    "reset, a next call reconnects)"
                ) from None
            reply = decode_reply(frames, self._limits)
            if reply.request_id == request.request_id:
                return reply
            _LOG.debug("discarded a stale %s for request %s", reply.kind.value, reply.request_id)
        raise RequestTimeout(
            f"{request.kind.value}: no reply to request {request.request_id} from {self._endpoint} within "
            f"{self._timeout_s} s (its timeout; the socket was reset, a next call reconnects)"
        )

    def _poll(self, socket: zmq.Socket[bytes], event: int, request: Request, deadline: float) -> bool:
        """Whether `socket` is ready for `event` before `deadline`; waits in slices so that `close()` cancels. Waiting
        for a reply, a lost connection also ends the wait (True, with nothing to read)."""
        poller = zmq.Poller()
        poller.register(socket, event)
        if self._monitor is not None:  # read as it comes, also while connecting: libzmq blocks once events pile up
            poller.register(self._monitor, zmq.POLLIN)
        while True:
            remaining_ms = _remaining_ms(deadline)
            ready = dict(poller.poll(min(remaining_ms, _CANCEL_POLL_MS)))
            lost = self._monitor in ready and self._connection_lost()
            if socket in ready or (lost and event == zmq.POLLIN):
                return True
            if self._closing.is_set():
                raise self._cancelled(request)
            if remaining_ms <= _CANCEL_POLL_MS:
                return False

    def _cancelled(self, request: Request) -> RequestCancelled:
        return RequestCancelled(f"{request.kind.value}: cancelled, the client to {self._endpoint} was closed")

    def _connected(self) -> zmq.Socket[bytes]:
        if self._socket is not None:
            return self._socket
        if self._context is None:
            self._context = zmq.Context()
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)  # an unsent request is stale once we give up on it
        socket.setsockopt(zmq.IMMEDIATE, 1)  # queue only to a live connection, never for a server that is down
        socket.setsockopt(zmq.IPV6, int(self._ipv6))
        if self._client_keys is not None:
            socket.curve_serverkey = self._server_public_key
            socket.curve_publickey = self._client_keys.public
            socket.curve_secretkey = self._client_keys.secret
        try:
            socket.connect(self._endpoint)
        except zmq.ZMQError as error:
            socket.close()  # a socket left open would keep `close()` waiting for the context forever
            raise ConfigError(f"endpoint: cannot connect to {self._endpoint!r} ({error.strerror})") from None
        self._socket = socket
        return socket

    @contextlib.contextmanager
    def _watching(self, socket: zmq.Socket[bytes]) -> Iterator[None]:
        """Watches `socket`'s connections for the call: a closed one is otherwise silent, and the call would wait out
        its whole timeout for a reply that cannot come (a server killed mid-request). Only during a call: an idle
        client reads no events, and libzmq blocks its I/O thread once unread ones pile up."""
        address = f"inproc://cosmos-edge-client-monitor-{id(self)}-{next(self._monitors)}"
        self._monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED, addr=address)
        try:
            yield
        finally:
            monitor, self._monitor = self._monitor, None
            while monitor.poll(0):  # what is unread would hold libzmq's I/O thread as the monitor stops
                monitor.recv_multipart()
            if not socket.closed:  # a reset socket took its monitor with it
                socket.disable_monitor()
            monitor.close()  # a socket left open would keep `close()` waiting for the context forever

    def _connection_lost(self) -> bool:
        """Whether a connection of the call's socket closed since the last look (each event read once)."""
        lost = False
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            lost = lost or event["event"] == zmq.EVENT_DISCONNECTED
        return lost

    def _reset(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _remaining_ms(deadline: float) -> int:
    return max(0, round((deadline - time.monotonic()) * 1e3))


def _timeout_ms(deadline: float) -> int:
    """The deadline as the server reads it: milliseconds from when the request arrives, at least 1."""
    return min(max(1, _remaining_ms(deadline)), MAX_TIMEOUT_MS)


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word
