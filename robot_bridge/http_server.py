"""The official Cosmos Policy ALOHA HTTP endpoint, `POST /act`, in front of a `PolicyServer`.

The official ALOHA client (`run_aloha_eval.py`) talks to its server over HTTP with json_numpy bodies (the format is in
`official_act`). This endpoint answers it as that server does, while the policies stay the `PolicyServer`'s: every
`/act` is queued with `PolicyServer.submit` and runs on its one worker thread, in line with the ZeroMQ controllers'
requests, in the mode in force (switched by either endpoint). Starlette on uvicorn, in a thread of its own with its
own event loop; bodies are decoded and replies encoded in the thread pool, off the event loop (though the JSON parser
holds the interpreter: a body at the size limit, tens of MB of lists, delays `/healthz` by up to about a second).

Routes: `POST /act`; `GET /healthz` (200 while the policy server serves, 503 otherwise); `GET /metadata` (the ZeroMQ
metadata plus how to reach each endpoint); `POST /mode` with `{"mode": NAME}`, as the ZeroMQ `set_mode`. Every error
is a 4xx or 5xx status with `{"error": message, "field": the key at fault or "", "code": the protocol's error code}`;
the official server instead answers 200 with the text "error".

Like the ZeroMQ endpoint, it listens on loopback unless told otherwise: whoever can POST to `/act` commands the robot,
and HTTP here has no authentication, so any other address needs `insecure_bind_all`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from cosmos_edge.robot_bridge.act_messages import SERVER_VERSION
from cosmos_edge.robot_bridge.binding import check_shutdown_timeout, is_local_endpoint
from cosmos_edge.robot_bridge.json_arrays import COMPACT, parse_json
from cosmos_edge.robot_bridge.log_limits import RateLimitedLog, RepeatFilter, peer_text
from cosmos_edge.robot_bridge.official_act import (
    CAMERAS,
    CandidateImageLists,
    OfficialQuery,
    check_official_cameras,
    parse_query,
    reply_body,
)
from cosmos_edge.robot_bridge.protocol import PROTOCOL_VERSION, ActReply, ActRequest, ErrorCode, MessageError
from cosmos_edge.robot_bridge.server import PolicyServer, ms_since
from cosmos_edge.runtime.errors import ConfigError, EngineError

_LOG = logging.getLogger(__name__)

OFFICIAL_PORT = 8777  # the official server's default, which its client hard-codes
_START_TIMEOUT_S = 10.0
# How long an `/act` that arrives as serving begins (the server answers what was queued while the models loaded)
# waits for it: the official client does not retry an `overloaded` answer.
_SERVING_WAIT_S = 5.0
_DISCONNECT_POLL_S = 0.1  # how often a request waiting for its reply checks that its client is still there
# uvicorn's own shutdown wait runs this much past the server's window: a request answered `shutting_down` as the
# window ends still has its reply written and its connection closed, rather than cancelled with an error line.
_REPLY_MARGIN_S = 1.0
_SERVER_ANSWERS_S = 0.5  # within that margin, how long the policy server's own answers at its window's end may take
_MODE_BODY_BYTES = 4096  # `{"mode": NAME}`: parsed on the event loop, so never a large body
_MAX_WARNED_KEY_SETS = 16  # sets of ignored /act keys warned about: a peer chooses them
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that closed the connection before the answer
_STATUS = {
    ErrorCode.MALFORMED: 400,
    ErrorCode.UNSUPPORTED_VERSION: 400,
    ErrorCode.UNKNOWN_KIND: 404,
    ErrorCode.SUPERSEDED: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.INVALID_FIELD: 422,
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.UNKNOWN_MODE: 422,
    ErrorCode.INTERNAL: 500,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.EXPIRED: 504,
    ErrorCode.SHUTTING_DOWN: 503,
}


@dataclass(frozen=True)
class HttpConfig:
    """`host`/`port` to listen on (port 0: any free port, see `HttpEndpoint.url`).

    `max_connections` bounds the connections handled at once (uvicorn answers a request on one more with a plain
    503), `max_body_bytes` a request body (413). A connection must send each request whole (headers and body) within
    `request_read_timeout_s` of opening or of its last reply, or it is closed: a peer that connects and sends
    nothing, or half a request, does not keep one of those places.
    """

    host: str = "127.0.0.1"
    port: int = OFFICIAL_PORT
    insecure_bind_all: bool = False
    max_body_bytes: int = 16 * 2**20
    max_connections: int = 32
    shutdown_timeout_s: float = 5.0
    request_read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.host or not 0 <= self.port <= 65535:
            raise ConfigError(f"http address: expected HOST:PORT with a port in 0..65535, got {self.address!r}")
        for name in ("max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {getattr(self, name)}")
        check_shutdown_timeout(self.shutdown_timeout_s)
        if not (isinstance(self.request_read_timeout_s, (int, float)) and 0 < self.request_read_timeout_s <= 3600):
            raise ConfigError(
                f"request_read_timeout_s: expected seconds in (0, 3600], got {self.request_read_timeout_s}"
            )
        if not is_local_endpoint(f"tcp://{self.address}") and not self.insecure_bind_all:
            raise ConfigError(
                f"http address: {self.address!r} is reachable from other machines, and HTTP has no authentication, so "
                "anyone there could command the robot; listen on 127.0.0.1, or allow it explicitly "
                "(serve --http-insecure-bind-all; HttpConfig.insecure_bind_all)"
            )

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _official_field(error: MessageError) -> MessageError:
    """A `PolicyServer` error on `instruction`, which the official request sent as `task_description`. Only for the
    server's errors: those of `parse_query` name the key as the client sent it (an `instruction` there is unknown)."""
    if error.field != "instruction":
        return error
    return MessageError(error.code, "task_description", error.detail, error.request_id)


def parse_address(address: str) -> tuple[str, int]:
    """(host, port) of "HOST:PORT", such as "127.0.0.1:8777", "localhost:0" or "[::1]:8777"."""
    host, separator, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit():
        raise ConfigError(f"http address: expected HOST:PORT such as 127.0.0.1:{OFFICIAL_PORT}, got {address!r}")
    return host, int(port)


def bind(config: HttpConfig) -> socket.socket:
    """A socket bound to `config`'s address (for `HttpEndpoint`), or `ConfigError` naming the address. It listens
    only when the endpoint starts: connections made before (while `serve` loads its models) are refused by the
    system, where a listening socket would queue them to be computed, minutes late, once serving begins."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # IPPROTO_TCP named explicitly: asyncio sets TCP_NODELAY only on connections whose socket says so, and without
    # it each reply (header and body written apart) waits out the client's delayed ACK, about 40 ms.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart at once on the same port
        listener.bind((config.host, config.port))
        # Off once bound: two sockets that both allow reuse and do not listen yet may bind one port, and another
        # `serve` would find the port in use only when it starts listening, after loading its models.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
    except OSError as error:
        listener.close()
        raise ConfigError(f"http address: cannot listen on {config.address} ({error.strerror or error})") from None
    return listener


class _ClientGone(Exception):
    """The client of a request disconnected while it waited for its reply."""


class HttpEndpoint:
    """Serves `POST /act` and the other routes for `server`, which must serve the ALOHA platform.

    Lifecycle: `start()` listens (on `listener` when given: a socket from `bind`, which the endpoint takes over) and
    starts the thread, `stop()` finishes the requests in flight and returns; also a context manager. Start it before or
    while `server.serve_forever()` runs: an `/act` that arrives before serving begins waits for it (up to
    `_SERVING_WAIT_S`, then `overloaded`); requests are refused once the server stops.

    `image_lists`: per mode, how the official reply lays out its candidates' future-image entries (a mode not named
    lays them out as the reactive mode).
    """

    def __init__(
        self,
        server: PolicyServer,
        config: HttpConfig | None = None,
        *,
        listener: socket.socket | None = None,
        image_lists: Mapping[str, CandidateImageLists] | None = None,
    ) -> None:
        self._server = server
        self._config = config or HttpConfig()
        self._image_lists = dict(image_lists or {})
        self._listener = listener
        metadata = server.metadata()
        check_official_cameras(metadata.platform, metadata.cameras)
        self._image_size = metadata.image_size
        self._proprio_dim = metadata.proprio_dim
        self._requests = 0  # request ids, counted on the event loop thread
        self._refusals = RateLimitedLog(_LOG)  # per client address; on the event loop thread
        self._warned_ignored: set[tuple[str, ...]] = set()  # sets of ignored keys warned about; on the event loop
        # One body parsed at a time: JSON lists become Python objects about 20x their size (the GIL would run
        # parses one after another anyway), so the bodies of every open connection are never expanded at once.
        # Made by `start`: a lock belongs to the event loop it first waits on, and each start runs a new one.
        self._parsing: asyncio.Lock | None = None
        routes = [
            Route("/act", self._act, methods=["POST"]),
            Route("/healthz", self._healthz, methods=["GET"]),
            Route("/metadata", self._metadata, methods=["GET"]),
            Route("/mode", self._mode, methods=["POST"]),
        ]
        handlers = {HTTPException: _http_error, Exception: _internal_error}
        self._app = Starlette(routes=routes, exception_handlers=handlers)
        self._uvicorn: _Server | None = None
        self._stop_requested_at: float | None = None
        self._stop_now = False  # `request_stop(now=True)`: the shutdown window ended at once
        self._thread: threading.Thread | None = None
        self._uvicorn_filters = (RepeatFilter(), _CancelsAtShutdown())  # a peer triggers uvicorn's lines at will
        self._port = self._config.port

    @property
    def url(self) -> str:
        """The base URL; after `start()`, with a port 0 resolved."""
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"http://{host}:{self._port}"

    def start(self) -> str:
        """Listens, starts serving in a thread and returns the base URL once requests are answered."""
        if self._thread is not None:
            return self.url
        for uvicorn_filter in self._uvicorn_filters:  # removed once it has stopped
            logging.getLogger("uvicorn.error").addFilter(uvicorn_filter)
        listener, self._listener = self._listener or bind(self._config), None  # uvicorn closes it when it stops
        try:
            # On again to listen: Linux checks the port again at `listen`, and without it the TIME-WAIT connections
            # of a `serve` that just stopped on this port would refuse it for a minute (the accepted connections
            # inherit it too). A second `serve` still fails at its own bind while this one loads: reuse needs both.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.listen()
        except OSError as error:  # another socket took the address since it was bound
            listener.close()
            detail = error.strerror or error
            raise ConfigError(f"http address: cannot listen on {self._config.address} ({detail})") from None
        self._port = listener.getsockname()[1]
        config = uvicorn.Config(
            self._app,
            loop="asyncio",  # not uvloop, which would replace the event loop policy of the whole process
            lifespan="off",
            log_config=None,  # keep the process's logging; we log one line per request ourselves
            log_level="warning",
            access_log=False,
            limit_concurrency=self._config.max_connections + 1,  # uvicorn counts the connection asking too
            http=_closing_slow_requests(self._config.request_read_timeout_s),
            timeout_graceful_shutdown=math.ceil(self._config.shutdown_timeout_s + _REPLY_MARGIN_S),
        )
        self._uvicorn = _Server(config)
        self._stop_requested_at = None  # monotonic, once `request_stop` is called
        self._stop_now = False
        self._parsing = asyncio.Lock()
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [listener]}, name="http-endpoint", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                listener.close()
                raise EngineError(f"http address: the server on {self.url} did not start; see the log")
            time.sleep(0.01)
        _LOG.info("serving http=%s routes=POST /act, GET /healthz, GET /metadata, POST /mode", self.url)
        return self.url

    def request_stop(self, *, now: bool = False) -> None:
        """Stops accepting now and lets the requests in flight finish (up to the shutdown timeout; those still waiting
        then are answered `shutting_down`), without waiting: it only sets attributes, so a signal handler may call
        it. `now` ends the window at once (an operator's second Ctrl-C): those waiting are answered `shutting_down`,
        and bodies still arriving are not waited for. `stop` waits for the end."""
        if self._uvicorn is not None:
            self._stop_requested_at = self._stop_requested_at or time.monotonic()
            self._uvicorn.should_exit = True
            if now and not self._stop_now:
                self._stop_now = True
                self._uvicorn.force_exit = True  # uvicorn stops waiting for connections and tasks
                self._uvicorn.cancel_requests()

    def _stop_window_over(self) -> bool:
        """Whether the shutdown window, and the policy server's answers at its end (when it stops too, as `serve`
        stops both at once), are over: a request still waiting then is answered by this endpoint."""
        started = self._stop_requested_at
        window_s = self._config.shutdown_timeout_s + _SERVER_ANSWERS_S
        return started is not None and (self._stop_now or time.monotonic() - started >= window_s)

    def stop(self) -> None:
        """Stops accepting, lets the requests in flight finish (up to the shutdown timeout) and joins the thread."""
        if self._thread is None or self._uvicorn is None:
            return
        self.request_stop()
        limit_s = math.ceil(self._config.shutdown_timeout_s + _REPLY_MARGIN_S)  # as uvicorn's own
        self._thread.join(limit_s + 1.0)
        if self._thread.is_alive():  # its filters stay: it may still log
            _LOG.error("the http endpoint did not stop within %.1f s", limit_s)
        else:
            for uvicorn_filter in self._uvicorn_filters:
                logging.getLogger("uvicorn.error").removeFilter(uvicorn_filter)
        self._thread = None
        self._uvicorn = None

    def __enter__(self) -> HttpEndpoint:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # --- routes (on the event loop thread) -------------------------------------------------------------------------

    async def _act(self, request: Request) -> Response:
        started = time.perf_counter()
        self._requests += 1
        request_id = self._requests
        peer = _peer(request)
        body = None
        try:
            body = await self._body(request)
            assert self._parsing is not None, "set by start()"
            async with self._parsing:
                query = await run_in_threadpool(parse_query, body, self._image_size, self._proprio_dim)
            decode_ms = ms_since(started)
            self._warn_ignored(query.ignored_keys)
            reply = await self._submit(self._act_request(request_id, query), peer, decode_ms, request)
            waited = time.perf_counter()
            content = await run_in_threadpool(reply_body, reply, query, self._image_lists.get(reply.mode))
        except asyncio.CancelledError:
            if self._stop_requested_at is None:  # not the shutdown's: let it end the request
                raise
            # The shutdown window ended (uvicorn cancels what is left), or a second stop cancelled it: answered in the
            # usual form instead of a traceback and a bare 500, the cancellation handled.
            task = asyncio.current_task()
            if task is not None and sys.version_info >= (3, 11):  # the count of requested cancellations
                task.uncancel()
            detail = "the server shut down before " + ("the body arrived" if body is None else "this was answered")
            error = MessageError(ErrorCode.SHUTTING_DOWN, "body" if body is None else "", detail, request_id)
            return self._refused(request, peer, request_id, started, error)
        except _ClientGone:
            _LOG.info(
                "kind=http_act peer=%s request_id=%s status=client_gone total_ms=%.3f",
                peer,
                request_id,
                ms_since(started),
            )
            return Response(status_code=_CLIENT_CLOSED_REQUEST)  # nobody reads it; for the access logs of proxies
        except MessageError as error:
            return self._refused(request, peer, request_id, started, error)
        self._refusals.tick()  # counts the refusals its last window held back
        _LOG.info(
            "kind=http_act peer=%s request_id=%s status=200 mode=%s double_encoded=%s decode_ms=%.3f encode_ms=%.3f "
            "total_ms=%.3f%s",
            peer,
            request_id,
            reply.mode,
            query.double_encoded,
            decode_ms,
            ms_since(waited),
            ms_since(started),
            _ignored_keys_text(query.ignored_keys),
        )
        return Response(content, media_type="application/json")

    def _refused(self, request: Request, peer: str, request_id: int, started: float, error: MessageError) -> Response:
        """The error reply of a refused `/act`, and its log line."""
        # A client sending bad requests as fast as it can must not fill the log: as the ZeroMQ server's refusals.
        self._refusals.log(
            _address(request),
            logging.INFO,
            "kind=http_act peer=%s request_id=%s status=%s code=%s field=%s total_ms=%.3f",
            peer,
            request_id,
            "client_gone" if isinstance(error, _LeftMidBody) else _STATUS[error.code],  # none was sent
            error.code.value,
            peer_text(error.field),
            ms_since(started),
        )
        return _error_response(error)

    def _warn_ignored(self, keys: tuple[str, ...]) -> None:
        """Warns once per set of keys a request held that are not read (a client expecting its `seed` applied, a
        misspelt optional key); a bounded number of sets, as a peer chooses them."""
        if not keys:
            return
        shown = tuple(peer_text(key) for key in keys)  # kept as shown: a peer's key may be megabytes long
        if shown in self._warned_ignored or len(self._warned_ignored) >= _MAX_WARNED_KEY_SETS:
            return
        self._warned_ignored.add(shown)
        seed = "; the server's seed applies to every /act request" if "seed" in keys else ""
        _LOG.warning(
            "http /act: ignoring keys %s, as the official server ignores them (said once per set of keys%s)",
            ",".join(shown),
            seed,
        )

    async def _submit(self, act: ActRequest, peer: str, decode_ms: float, request: Request) -> ActReply:
        """The server's reply to `act`; its refusals name the official request's keys. A client that disconnects
        while its request waits gives up its place: the request is cancelled, never computed."""
        if not self._server.accepting:  # listening began just before serving: wait for it rather than refuse
            await run_in_threadpool(self._server.wait_until_accepting, _SERVING_WAIT_S)
        try:
            submitted = self._server.submit(act, peer=peer, decode_ms=decode_ms)
        except MessageError as error:
            raise _official_field(error) from None
        reply = asyncio.wrap_future(submitted)
        try:
            while not (await asyncio.wait({reply}, timeout=_DISCONNECT_POLL_S))[0]:
                if await request.is_disconnected():
                    submitted.cancel()  # skipped by the worker if it has not started; a running one is not stopped
                    raise _ClientGone
                if self._stop_window_over():  # answered before uvicorn's own timeout would cancel this request
                    submitted.cancel()
                    detail = "the http endpoint stopped before this request was answered"
                    raise MessageError(ErrorCode.SHUTTING_DOWN, "", detail, act.request_id)
        except asyncio.CancelledError:  # uvicorn gave up on it: nobody will read the reply, so it is not computed
            submitted.cancel()
            raise
        try:
            return reply.result()
        except MessageError as error:
            raise _official_field(error) from None

    def _act_request(self, request_id: int, query: OfficialQuery) -> ActRequest:
        """The request, pinned to the mode in force (the server checks it and the instruction against that mode)."""
        metadata = self._server.metadata()
        return ActRequest(
            request_id,
            obs_id=request_id,
            capture_time_ns=time.time_ns(),  # the official client sends no timestamp; the server does not read it
            instruction=query.task_description,
            images=query.images,
            proprio=query.proprio,
            mode=metadata.mode,
            return_all_query_results=query.return_all_query_results,
            return_actions_by_depth=query.return_all_query_results,
        )

    async def _healthz(self, request: Request) -> Response:
        serving = self._server.serving
        status = {
            "status": "ok" if serving else "not serving",
            "mode": self._server.metadata().mode,
            "server_version": SERVER_VERSION,
        }
        return _json(status, 200 if serving else 503)

    async def _metadata(self, request: Request) -> Response:
        content = self._server.metadata().as_dict()
        content["endpoints"] = {
            "http": {
                "url": self.url,
                "act": "POST /act, the official Cosmos Policy ALOHA format (json_numpy arrays)",
                "cameras": dict(CAMERAS),
            },
            # None when the ZeroMQ socket is in-process only (`serve --endpoint none`): nothing outside can reach it.
            "zeromq": None
            if self._server.endpoint.startswith("inproc://")
            else {"endpoint": self._server.endpoint, "protocol_version": PROTOCOL_VERSION},
        }
        return _json(content)

    async def _mode(self, request: Request) -> Response:
        try:
            payload = parse_json((await self._body(request, _MODE_BODY_BYTES)).decode("utf-8"))
            if not isinstance(payload, dict):
                raise MessageError(ErrorCode.INVALID_FIELD, "body", 'expected {"mode": NAME}')
            if extra := sorted(set(payload) - {"mode"}):
                key = peer_text(str(extra[0]))
                raise MessageError(ErrorCode.INVALID_FIELD, key, 'unexpected key; expected {"mode": NAME}')
            if not isinstance(payload.get("mode"), str):
                raise MessageError(ErrorCode.INVALID_FIELD, "mode", 'expected {"mode": NAME}, NAME a string')
            changed = self._server.set_mode(payload["mode"])
        except ValueError as error:  # MessageError is one, as are unreadable bytes and text
            if not isinstance(error, MessageError):
                error = MessageError(ErrorCode.MALFORMED, "body", f"expected a JSON object ({error})")
            return _error_response(error)
        return _json({"mode": changed.mode, "previous_mode": changed.previous_mode})

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        """The body, up to `limit` bytes (default: the configured most)."""
        limit = self._config.max_body_bytes if limit is None else limit
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise MessageError(ErrorCode.TOO_LARGE, "body", f"expected at most {limit} bytes, got {declared}")
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise MessageError(ErrorCode.TOO_LARGE, "body", f"expected at most {limit} bytes, got more")
                chunks.append(chunk)
        except ClientDisconnect:  # a refusal like any other (one rate-limited log line), answered to nobody
            detail = f"the connection closed after {size} bytes (the client left, or the read timeout closed it)"
            raise _LeftMidBody(ErrorCode.MALFORMED, "body", detail) from None
        return b"".join(chunks)


class _Server(uvicorn.Server):
    """uvicorn's server, keeping its event loop: a stop from another thread (a signal handler's) schedules there."""

    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def cancel_requests(self) -> None:
        """Cancels every request in progress (from any thread): each then answers `shutting_down` and its connection
        closes, so nothing holds the shutdown (on Python 3.12 and later it waits for every connection to close)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:  # on the event loop
        for task in list(self.server_state.tasks):
            task.cancel()


class _CancelsAtShutdown(logging.Filter):
    """uvicorn's "Cancel N running task(s), timeout graceful shutdown exceeded" at the end of the window is how a
    request still receiving its body then ends, as documented (its own line says `shutting_down`): a warning, not the
    error uvicorn logs it as."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Cancel %s running task(s)"):
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


class _LeftMidBody(MessageError):
    """The connection closed before the body was whole (the client left, or was closed for being too slow): a
    refusal answered to nobody."""


def _closing_slow_requests(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection that has not sent a whole request (headers and body) within
    `timeout_s` of opening or of its last reply. uvicorn itself times out neither: an idle new connection, or one
    stalled mid-request, would hold its place among `max_connections` until the peer closed it."""

    class ClosingSlowRequests(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn's narrower override
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(timeout_s, self._close_if_incomplete)

        def _close_if_incomplete(self) -> None:
            # IDLE: no whole request head yet; SEND_BODY: its body still arriving. The app of one that stalls sees
            # its client leave (a logged refusal); a request received whole stays open however long it runs.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                _LOG.info(
                    "kind=http_connection peer=%s status=closed reason=incomplete_request timeout_s=%g",
                    _peer_of(self.client),
                    timeout_s,
                )
                self.transport.close()

    return ClosingSlowRequests


def _json(content: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(COMPACT.encode(content), status_code=status, headers=headers, media_type="application/json")


def _error_response(error: MessageError) -> Response:
    return _json({"error": str(error), "field": error.field, "code": error.code.value}, _STATUS[error.code])


async def _http_error(request: Request, error: Exception) -> Response:
    """Routing errors (unknown path, wrong method) in the same JSON form as the others."""
    assert isinstance(error, HTTPException)  # the handler is registered for these only
    field = "method" if error.status_code == 405 else "path"
    detail = f"{request.method} {request.url.path}: {error.detail}"
    content = {"error": detail, "field": field, "code": ErrorCode.UNKNOWN_KIND.value}
    return _json(content, error.status_code, error.headers)  # a 405's headers list the allowed methods


async def _internal_error(request: Request, error: Exception) -> Response:
    """A bug of ours, answered in the same JSON form; Starlette re-raises it after this reply and uvicorn logs it."""
    detail = f"{request.method} {request.url.path} failed ({type(error).__name__}); see the server log"
    return _json({"error": detail, "field": "", "code": ErrorCode.INTERNAL.value}, 500)


def _ignored_keys_text(keys: tuple[str, ...]) -> str:
    """The access log's mention of the keys a request held that are not read (where a client's typo shows)."""
    return f" ignored_keys={','.join(peer_text(key) for key in keys)}" if keys else ""


def _address(request: Request) -> str:
    """The client's host: a client opening a connection per request still counts as one."""
    return request.client.host if request.client else ""


def _peer(request: Request) -> str:
    return _peer_of(request.client)


def _peer_of(client: tuple[str, int] | None) -> str:
    return f"http:{client[0]}:{client[1]}" if client else "http"
