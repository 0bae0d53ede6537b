"""The policy server: a ZeroMQ ROUTER socket in front of one `Policy` per mode.

Two threads. The I/O thread (the one calling `serve_forever`) owns the ROUTER socket: it decodes and validates every
request, answers `ping`, `metadata` and `set_mode` at once, and queues `act` requests. The worker thread runs
`Policy.infer` and hands encoded replies back over an inproc PAIR socket, since ZeroMQ sockets must not be shared
between threads. So the server stays responsive while a chunk is being inferred.

The queue keeps at most one waiting `act` per controller (ROUTER identity): a newer observation replaces the one still
waiting, which is answered with a `superseded` error so its sender is not left hanging. Controllers are served in
arrival order, and at most `max_pending` may wait at once. Anything malformed or rejected gets an `error` reply and
the server carries on.

Other front ends in the same process (the official-compatible HTTP endpoint) queue their requests with `submit`, so
every inference, whichever endpoint asked for it, runs on the one worker thread, in arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from importlib import metadata
from types import TracebackType

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from cosmos_edge.robot_bridge.curve import ServerCurve, start_authenticator
from cosmos_edge.robot_bridge.protocol import (
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
    decode_request,
)
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import IMAGE_SIZE
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, Observation, Policy

logger = logging.getLogger(__name__)

try:
    SERVER_VERSION = metadata.version("cosmos-edge")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    SERVER_VERSION = "unknown"

_POLL_MS = 50  # how quickly `stop()` from another thread or a signal handler takes effect
_RECEIVE_BATCH = 64  # requests taken per wake-up before replies are forwarded again
_RECEIVE_HWM = 32  # messages libzmq queues per controller connection: bounds what a flood can make us hold


@dataclass(frozen=True)
class ServerConfig:
    """`endpoint` is a ZeroMQ bind address; `tcp://127.0.0.1:*` picks a free port (see `PolicyServer.endpoint`).

    Binding anything but loopback, `ipc://` or `inproc://` needs `curve` (authenticated clients) or an explicit
    `insecure_bind_all`. `image_size` is the (height, width) every camera image must have. `joint_limits`, one
    (lower, upper) pair per action dim, is passed on to controllers in the metadata.
    """

    endpoint: str = "tcp://127.0.0.1:5555"
    limits: WireLimits = field(default_factory=WireLimits)
    image_size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)
    default_mode: str = "reactive"
    max_pending: int = 8
    curve: ServerCurve | None = None
    insecure_bind_all: bool = False
    joint_limits: tuple[tuple[float, float], ...] | None = None
    shutdown_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_pending < 1:
            raise ConfigError(f"max_pending: expected >= 1, got {self.max_pending}")
        if self.shutdown_timeout_s <= 0:
            raise ConfigError(f"shutdown_timeout_s: expected > 0, got {self.shutdown_timeout_s}")
        if not is_local_endpoint(self.endpoint) and self.curve is None and not self.insecure_bind_all:
            raise ConfigError(
                f"endpoint: {self.endpoint!r} is reachable from other machines, and without CURVE keys anyone there "
                "could command the robot; bind 127.0.0.1, configure CURVE, or pass insecure_bind_all explicitly"
            )


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, `ipc://` (file permissions) and `inproc://`."""
    scheme, separator, address = endpoint.partition("://")
    if not separator or scheme not in ("tcp", "ipc", "inproc"):
        raise ConfigError(f"endpoint: expected tcp://, ipc:// or inproc://, got {endpoint!r}")
    if scheme != "tcp":
        return True
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name or a host name: assume reachable
        return False


@dataclass(frozen=True)
class _Job:
    identity: bytes  # the queue key: a ROUTER identity, or a `submit` key no ZeroMQ peer can have
    request: ActRequest
    mode: str
    receive_ns: int  # wall clock, reported to the controller
    received_at: float  # perf_counter, for durations
    decode_ms: float
    peer: str  # for the log
    future: Future[ActReply] | None = None  # set for `submit`: the reply goes there instead of the ROUTER socket


class PolicyServer:
    """Serves `policies` (one per mode, or a single policy as the default mode) on `config.endpoint`.

    Lifecycle: `start()` binds (and is called by `serve_forever()` if needed); `serve_forever()` blocks until
    `stop()`, which any thread or a signal handler may call; then everything is closed. Also a context manager.
    """

    def __init__(self, policies: Policy | Mapping[str, Policy], config: ServerConfig | None = None) -> None:
        self._config = config or ServerConfig()
        mode = self._config.default_mode
        self._policies = dict(policies) if isinstance(policies, Mapping) else {mode: policies}
        if mode not in self._policies:
            raise ConfigError(f"default_mode: {mode!r} has no policy; modes are {sorted(self._policies)}")
        self._platform = self._policies[mode].platform
        for name, policy in self._policies.items():
            if policy.platform != self._platform:
                raise ConfigError(f"policies[{name!r}]: platform {policy.platform.name!r} != {self._platform.name!r}")
        first, *others = (policy.instructions for policy in self._policies.values())
        self._instructions = tuple(text for text in first if all(text in other for other in others))
        self._mode = mode
        self._lock = threading.Lock()  # guards _pending and _mode
        self._work_ready = threading.Condition(self._lock)
        self._pending: OrderedDict[bytes, _Job] = OrderedDict()
        self._stopping = threading.Event()
        self._idle = threading.Event()  # clear while serve_forever runs
        self._idle.set()
        self._context: zmq.Context[zmq.Socket[bytes]] | None = None
        self._socket: zmq.Socket[bytes] | None = None
        self._replies: zmq.Socket[bytes] | None = None
        self._authenticator: ThreadAuthenticator | None = None
        self._reply_address = f"inproc://cosmos-edge-replies-{id(self):x}"
        self._endpoint = self._config.endpoint
        self._submissions = itertools.count(1)
        try:  # the metadata checks mode names and joint limits; better to fail here than on a controller's request
            self._metadata(0)
        except MessageError as error:
            raise ConfigError(f"server metadata: {error}") from None

    @property
    def endpoint(self) -> str:
        """The bound endpoint after `start()`, with a wildcard port resolved."""
        return self._endpoint

    @property
    def serving(self) -> bool:
        """True while `serve_forever` runs and has not been asked to stop."""
        return not self._idle.is_set() and not self._stopping.is_set()

    def metadata(self) -> ServerMetadata:
        """What the `metadata` request answers (request id 0). Thread-safe."""
        return self._metadata(0)

    def set_mode(self, mode: str) -> ModeSet:
        """Switches the default mode as the `set_mode` request does; `MessageError` for an unknown mode. Thread-safe."""
        return self._set_mode(SetModeRequest(0, mode))

    def submit(self, request: ActRequest, *, peer: str, decode_ms: float = 0.0) -> Future[ActReply]:
        """Queues an `act` from another front end and returns the future of its reply. Thread-safe.

        It waits in the same queue, under the same `max_pending`, for the same worker as the controllers' requests,
        but under a key of its own: it never replaces, and is never replaced by, another request. Rejections on
        arrival (unknown mode, cameras or sizes that do not match the platform, too many waiting, shutting down)
        raise `MessageError`; the future fails with one for the rest (shutting down, the policy rejected or failed).
        A future cancelled while it waits is skipped. `peer` names the sender in the log.
        """
        started = time.perf_counter() - decode_ms / 1e3  # when the request arrived, for the queue and total times
        # libzmq reserves identities that start with a zero byte for the 5-byte ones it generates: this key is longer.
        key = b"\x00submit-%d" % next(self._submissions)
        future: Future[ActReply] = Future()
        mode = self._act_mode(request)
        self._enqueue(_Job(key, request, mode, time.time_ns(), started, decode_ms, peer, future))
        return future

    def start(self) -> str:
        if self._socket is not None:
            return self._endpoint
        self._context = zmq.Context()
        try:
            self._bind(self._context)
        except BaseException:
            self.close()
            raise
        logger.info(
            "serving platform=%s modes=%s endpoint=%s", self._platform.name, list(self._policies), self.endpoint
        )
        return self._endpoint

    def _bind(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        socket = context.socket(zmq.ROUTER)
        self._socket = socket
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished controller raises instead of vanishing
        socket.setsockopt(zmq.LINGER, 100)  # flush final replies on close, briefly
        socket.setsockopt(zmq.RCVHWM, _RECEIVE_HWM)
        # libzmq drops a single frame over the whole-message limit without buffering it (and disconnects the peer,
        # so there is no reply); a message whose frames only add up to more is read and answered with `too_large`.
        socket.setsockopt(zmq.MAXMSGSIZE, self._config.limits.max_message_bytes)
        if self._config.curve is not None:
            self._authenticator = start_authenticator(context, self._config.curve)
            socket.curve_server = True
            socket.curve_publickey = self._config.curve.keys.public
            socket.curve_secretkey = self._config.curve.keys.secret
        socket.bind(self._config.endpoint)
        self._endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._replies = context.socket(zmq.PAIR)
        self._replies.bind(self._reply_address)

    def serve_forever(self) -> None:
        """Serves until `stop()`, then closes the server."""
        self.start()
        assert self._socket is not None and self._replies is not None
        self._idle.clear()
        worker = threading.Thread(target=self._work, name="policy-worker", daemon=True)
        worker.start()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                ready = dict(poller.poll(_POLL_MS))
                if self._replies in ready:
                    self._forward_replies()
                if self._socket in ready:
                    self._receive_requests()
        finally:
            self._shut_down(worker)
            self._idle.set()

    def stop(self) -> None:
        """Asks `serve_forever` to return. Only sets a flag, so it is safe in a signal handler."""
        self._stopping.set()

    def close(self) -> None:
        for socket in (self._socket, self._replies):
            if socket is not None:
                socket.close()
        self._socket = self._replies = None
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None
        if self._context is not None:
            self._context.term()
            self._context = None

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
        if self._idle.wait(self._config.shutdown_timeout_s + 1.0):
            self.close()  # sockets belong to the serving thread until serve_forever returns

    # --- I/O thread ------------------------------------------------------------------------------------------------

    def _receive_requests(self) -> None:
        assert self._socket is not None
        for _ in range(_RECEIVE_BATCH):
            try:
                identity, *frames = self._socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(identity.bytes, frames)

    def _handle(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        receive_ns = time.time_ns()
        started = time.perf_counter()
        try:
            request = decode_request(frames, self._config.limits)
            if isinstance(request, ActRequest):
                mode = self._act_mode(request)
                self._enqueue(_Job(identity, request, mode, receive_ns, started, _ms_since(started), identity.hex()))
                return
            reply: ServerMetadata | Pong | ModeSet
            if isinstance(request, MetadataRequest):
                reply = self._metadata(request.request_id)
            elif isinstance(request, PingRequest):
                reply = Pong(request.request_id, time.time_ns(), SERVER_VERSION)
            else:
                reply = self._set_mode(request)
        except MessageError as error:
            self._send(identity, ErrorReply.from_error(error).to_frames())
            logger.info(
                "kind=error peer=%s request_id=%s code=%s field=%s total_ms=%.3f",
                identity.hex(),
                error.request_id,
                error.code.value,
                error.field,
                _ms_since(started),
            )
            return
        self._send(identity, reply.to_frames())
        level = logging.DEBUG if isinstance(reply, Pong) else logging.INFO
        peer = identity.hex()
        logger.log(
            level,
            "kind=%s peer=%s request_id=%s total_ms=%.3f",
            request.kind.value,
            peer,
            request.request_id,
            _ms_since(started),
        )

    def _act_mode(self, request: ActRequest) -> str:
        """The mode that will answer: the request's own, else the one in force when it arrived."""
        with self._lock:
            mode = request.mode or self._mode
        self._check_mode(mode, request.request_id)
        self._check_platform(request)
        return mode

    def _check_mode(self, mode: str, request_id: int) -> None:
        if mode not in self._policies:
            detail = f"expected one of {list(self._policies)}, got {mode!r}"
            raise MessageError(ErrorCode.UNKNOWN_MODE, "mode", detail, request_id)

    def _check_platform(self, request: ActRequest) -> None:
        cameras = self._platform.cameras
        if set(request.images) != set(cameras):
            detail = f"expected cameras {list(cameras)}, got {list(request.images)}"
            raise MessageError(ErrorCode.INVALID_FIELD, "images", detail, request.request_id)
        expected = (*self._config.image_size, 3)
        for camera, image in request.images.items():
            if image.shape != expected:
                detail = f"expected shape {expected}, got {image.shape}"
                raise MessageError(ErrorCode.INVALID_FIELD, f"image/{camera}", detail, request.request_id)
        if request.proprio.shape != (self._platform.proprio_dim,):
            detail = f"expected shape ({self._platform.proprio_dim},), got {request.proprio.shape}"
            raise MessageError(ErrorCode.INVALID_FIELD, "proprio", detail, request.request_id)

    def _enqueue(self, job: _Job) -> None:
        with self._lock:
            if self._stopping.is_set():  # nothing would run it: the worker is stopping or gone
                raise MessageError(ErrorCode.SHUTTING_DOWN, "", "the server is shutting down", job.request.request_id)
            replaced = self._pending.get(job.identity)
            full = replaced is None and len(self._pending) >= self._config.max_pending
            if not full:
                self._pending[job.identity] = job  # a replacement keeps its controller's place in line
                self._work_ready.notify()
        if full:
            detail = f"{self._config.max_pending} controllers are already waiting; retry later"
            raise MessageError(ErrorCode.OVERLOADED, "", detail, job.request.request_id)
        if replaced is not None:
            detail = f"observation {replaced.request.obs_id} replaced by {job.request.obs_id} before it ran"
            self._reply_error(replaced, ErrorCode.SUPERSEDED, "obs_id", detail)

    def _metadata(self, request_id: int) -> ServerMetadata:
        platform = self._platform
        with self._lock:
            mode = self._mode
        return ServerMetadata(
            request_id,
            platform=platform.name,
            cameras=platform.cameras,
            image_size=self._config.image_size,
            chunk_size=platform.chunk_size,
            control_rate_hz=platform.control_rate_hz,
            action_dim=platform.action_dim,
            proprio_dim=platform.proprio_dim,
            modes=tuple(self._policies),
            mode=mode,
            instructions=self._instructions,
            server_version=SERVER_VERSION,
            joint_limits=self._config.joint_limits,
        )

    def _set_mode(self, request: SetModeRequest) -> ModeSet:
        self._check_mode(request.mode, request.request_id)
        with self._lock:
            previous, self._mode = self._mode, request.mode
        logger.info("mode=%s previous_mode=%s", request.mode, previous)
        return ModeSet(request.request_id, request.mode, previous)

    def _reply_error(self, job: _Job, code: ErrorCode, field: str, detail: str) -> None:
        """Answers a queued `act` that will not run."""
        error = MessageError(code, field, detail, job.request.request_id)
        if job.future is None:
            self._send(job.identity, ErrorReply.from_error(error).to_frames())
        elif job.future.set_running_or_notify_cancel():  # False: its front end cancelled it, nobody is waiting
            job.future.set_exception(error)
        logger.info(
            "kind=act peer=%s request_id=%s obs_id=%s mode=%s status=%s total_ms=%.3f",
            job.peer,
            job.request.request_id,
            job.request.obs_id,
            job.mode,
            code.value,
            _ms_since(job.received_at),
        )

    def _forward_replies(self) -> None:
        assert self._replies is not None
        while True:
            try:
                identity, *frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._send(identity.bytes, frames)

    def _send(self, identity: bytes, frames: list[OutFrame] | list[zmq.Frame]) -> None:
        assert self._socket is not None
        try:
            self._socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
        except zmq.Again:
            logger.warning("dropped a reply to peer=%s: it is not reading its socket", identity.hex())
        except zmq.ZMQError as error:
            if error.errno != errno.EHOSTUNREACH:
                raise
            logger.debug("dropped a reply to peer=%s: it disconnected", identity.hex())

    def _shut_down(self, worker: threading.Thread) -> None:
        with self._lock:
            abandoned = list(self._pending.values())
            self._pending.clear()
            self._work_ready.notify_all()
        for job in abandoned:
            self._reply_error(job, ErrorCode.SHUTTING_DOWN, "", "the server is shutting down")
        worker.join(self._config.shutdown_timeout_s)
        if worker.is_alive():
            logger.error("the policy did not return within %.1f s of shutdown", self._config.shutdown_timeout_s)
            return  # leave the context open: terminating it would block on the worker's socket
        self._forward_replies()
        self.close()
        logger.info("stopped")

    # --- worker thread ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        assert self._context is not None
        replies = self._context.socket(zmq.PAIR)
        replies.connect(self._reply_address)
        try:
            while (job := self._next_job()) is not None:
                if job.future is not None and not job.future.set_running_or_notify_cancel():
                    continue  # its front end cancelled it while it waited: nobody to answer
                outcome = self._run(job)
                if job.future is None:
                    reply = outcome if isinstance(outcome, ActReply) else ErrorReply.from_error(outcome)
                    replies.send_multipart([job.identity, *reply.to_frames()], copy=False)
                elif isinstance(outcome, ActReply):
                    job.future.set_result(outcome)
                else:
                    job.future.set_exception(outcome)
        finally:
            replies.close()

    def _next_job(self) -> _Job | None:
        with self._work_ready:
            while not self._pending and not self._stopping.is_set():
                self._work_ready.wait()
            if self._stopping.is_set():
                return None
            return self._pending.popitem(last=False)[1]

    def _run(self, job: _Job) -> ActReply | MessageError:
        started = time.perf_counter()
        queue_ms = (started - job.received_at) * 1e3 - job.decode_ms
        try:
            result = self._policies[job.mode].infer(_query(job.request))
            reply = self._reply(job, result, queue_ms, _ms_since(started))
        except InputError as error:
            return self._log_failure(job, started, MessageError(ErrorCode.INVALID_INPUT, "", str(error)))
        except Exception as error:  # a failing policy must not take the server down; details stay in our log
            logger.exception("policy mode=%s failed on obs_id=%s", job.mode, job.request.obs_id)
            detail = f"the {job.mode!r} policy failed ({type(error).__name__}); see the server log"
            return self._log_failure(job, started, MessageError(ErrorCode.INTERNAL, "", detail))
        logger.info(
            "kind=act peer=%s request_id=%s obs_id=%s mode=%s status=ok %s total_ms=%.3f",
            job.peer,
            job.request.request_id,
            job.request.obs_id,
            job.mode,
            " ".join(f"{stage}_ms={ms:.3f}" for stage, ms in reply.timings_ms.items()),
            _ms_since(job.received_at),
        )
        return reply

    def _reply(self, job: _Job, result: ChunkResult, queue_ms: float, policy_ms: float) -> ActReply:
        expected = (self._platform.chunk_size, self._platform.action_dim)
        actions = np.asarray(result.actions, dtype=np.float32)
        if actions.shape != expected:
            raise ValueError(f"policy returned actions of shape {actions.shape}, expected {expected}")
        return ActReply(
            job.request.request_id,
            obs_id=job.request.obs_id,
            actions=actions,
            value=result.value,
            mode=job.mode,
            timings_ms={"decode": job.decode_ms, "queue": queue_ms, **result.timings_ms, "policy": policy_ms},
            server_version=SERVER_VERSION,
            server_receive_ns=job.receive_ns,
            server_send_ns=time.time_ns(),
        )

    def _log_failure(self, job: _Job, started: float, error: MessageError) -> MessageError:
        error.request_id = job.request.request_id
        logger.info(
            "kind=act peer=%s request_id=%s obs_id=%s mode=%s status=%s policy_ms=%.3f total_ms=%.3f",
            job.peer,
            job.request.request_id,
            job.request.obs_id,
            job.mode,
            error.code.value,
            _ms_since(started),
            _ms_since(job.received_at),
        )
        return error


@contextlib.contextmanager
def serving_in_thread(server: PolicyServer, join_timeout_s: float = 10.0) -> Iterator[str]:
    """Runs `server` on a background thread (for embedding it in a process, e.g. the demo); yields the bound endpoint,
    then stops it and waits up to `join_timeout_s` for the thread. Signal handling stays with the caller."""
    endpoint = server.start()
    thread = threading.Thread(target=server.serve_forever, name="policy-server", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.stop()
        thread.join(join_timeout_s)
        if thread.is_alive():
            logger.error("the policy server did not stop within %.1f s", join_timeout_s)


def _query(request: ActRequest) -> ActionQuery:
    query = ActionQuery(
        observation=Observation(images=request.images, proprio=request.proprio),
        instruction=request.instruction,
        steps=request.steps,
    )
    # An unset seed keeps the query's default (the official seed).
    return query if request.seed is None else dataclasses.replace(query, seed=request.seed)


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1e3
