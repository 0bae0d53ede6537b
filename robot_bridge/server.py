"""The policy server: a ZeroMQ ROUTER socket in front of one `Policy` per mode.

Two threads. The I/O thread (the one calling `serve_forever`) owns the ROUTER socket: it decodes and validates every
request, answers `ping`, `metadata` and `set_mode` at once, and queues `act` requests. The worker thread runs
`Policy.infer` and owns no ZeroMQ socket: it posts its answers to an outbox and wakes the I/O thread through a socket
pair, so no ZeroMQ socket or context is ever touched by two threads, and a policy call that never returns cannot keep
the context (and the port) open. So the server stays responsive while a chunk is being inferred.

The `act` requests wait in an `ActQueue` (see there): at most one per controller (ROUTER identity), a newer
observation superseding the one still waiting; a request whose deadline (`timeout_ms`) passes while it waits is
answered `expired` and never computed: its sender has given up. So is, as `overloaded`, an `act` that arrived before
serving began (while the process loaded its models): its sender may be long gone. Anything malformed or rejected gets
an `error` reply and the server carries on. Every queued request is answered exactly once.

Other front ends in the same process (the official-compatible HTTP endpoint) queue their requests with `submit`, so
every inference, whichever endpoint asked for it, runs on the one worker thread, in arrival order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from types import TracebackType

import zmq

from cosmos_edge.robot_bridge.act_messages import CLIENT_ARRAY_BYTES, SERVER_VERSION, act_reply, action_query
from cosmos_edge.robot_bridge.act_queue import ActQueue, Answer, Job, shutting_down
from cosmos_edge.robot_bridge.admission import ActAdmission
from cosmos_edge.robot_bridge.binding import FLUSH_MS, BoundRouter, ServerConfig, check_limits_hold_an_act
from cosmos_edge.robot_bridge.log_limits import RateLimitedLog, peer_text
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
    decode_request,
)
from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy.api import (
    PlanningOutcome,
    Policy,
)

_LOG = logging.getLogger(__name__)

_POLL_MS = 50  # how quickly `stop()` from another thread or a signal handler takes effect
_RECEIVE_BATCH = 64  # requests taken per wake-up before replies are forwarded again
# How long the connections stay open after the last reply before the server closes them. A client whose DEALER sets
# ZMQ_IMMEDIATE (PolicyClient does) loses a received reply it has not read yet when its connection closes: libzmq
# terminates the pipe without draining it.
_REPLY_GRACE_S = 0.5  # many times what a client blocked in poll needs to read it, even on a loaded machine
_WAKE_BYTES = 4096  # wake-up bytes read at once; any number of them means "look at the outbox"
_QUEUED_BATCHES = 64  # at most 64 x 64 requests answered as queued before serving (then serving begins)
_START_TIMEOUT_S = 30.0  # `serving_in_thread`: from the thread's start to queueing requests (no model loads there)


class PolicyServer:
    """Serves `policies` (one per mode, or a single policy as the default mode) on `config.endpoint`.

    Lifecycle: `start()` binds (and is called by `serve_forever()` if needed), unless `router` was bound already for
    this `config`; `serve_forever()` blocks until `stop()`, which any thread or a signal handler may call; then every
    request taken in is answered and everything is closed. Also a context manager.
    """

    def __init__(
        self,
        policies: Policy | Mapping[str, Policy],
        config: ServerConfig | None = None,
        *,
        router: BoundRouter | None = None,
    ) -> None:
        self._config = config or ServerConfig()
        mode = self._config.default_mode
        self._policies = dict(policies) if isinstance(policies, Mapping) else {mode: policies}
        if mode not in self._policies:
            raise ConfigError(f"default_mode: {mode!r} has no policy; modes are {sorted(self._policies)}")
        self._platform = self._policies[mode].platform
        for name, policy in self._policies.items():
            if policy.platform != self._platform:
                raise ConfigError(f"policies[{name!r}]: platform {policy.platform.name!r} != {self._platform.name!r}")
        # Read once: every `act` is checked against its mode's instructions on the I/O thread.
        self._admission = ActAdmission.of(self._policies, self._platform, self._config.image_size)
        common = frozenset.intersection(*self._admission.instructions.values())
        self._instructions = tuple(text for text in self._policies[mode].instructions if text in common)
        self._mode = mode
        self._mode_lock = threading.Lock()
        self._queue = ActQueue(self._config.max_pending)
        # `stop()` only sets this attribute: a signal handler runs on the I/O thread and must not take a lock that
        # thread may hold (`Event.set` takes one). The I/O thread turns it into `_stopping` for the other threads.
        self._stop_requested = False
        self._stop_now = False  # `stop(now=True)`: the shutdown window ends at once
        self._stopping = threading.Event()
        self._idle = threading.Event()  # clear while serve_forever runs
        self._idle.set()
        self._router = router
        self._endpoint = router.endpoint if router is not None else self._config.endpoint
        self._wake: tuple[socket.socket, socket.socket] | None = None  # (I/O thread's end, the other threads' end)
        self._worker: threading.Thread | None = None
        self._last_reply_at: float | None = None  # monotonic; I/O thread only
        self._peer_log = RateLimitedLog(_LOG)
        self._submissions = itertools.count(1)
        self._planning_cut_short = 0  # planning replies whose deadline passed (I/O thread only)
        self._worker_failure: BaseException | None = None  # what killed the worker, raised by serve_forever
        try:  # the metadata checks mode names and joint limits; better to fail here than on a controller's request
            self._metadata(0)
        except MessageError as error:
            raise ConfigError(f"server metadata: {error}") from None
        check_limits_hold_an_act(self._config.limits, self._config.image_size, self._platform)

    @property
    def endpoint(self) -> str:
        """The bound endpoint after `start()`, with a wildcard port resolved."""
        return self._endpoint

    @property
    def serving(self) -> bool:
        """True while `serve_forever` runs and has not been asked to stop."""
        return not self._idle.is_set() and not self._stop_requested and not self._stopping.is_set()

    @property
    def policy_running(self) -> bool:
        """True while a policy call is in progress: after `serve_forever` returned, one that outlived the shutdown
        window (still using the policies, which must then not be released)."""
        return self._worker is not None and self._worker.is_alive()

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
        arrival (unknown mode or instruction, cameras or sizes that do not match the platform, too many waiting,
        the server not serving yet, as the ZeroMQ requests queued while it started; shutting down) raise
        `MessageError`; the future fails with one for the rest (shutting down, expired, the
        policy rejected or failed). The future is resolved exactly once, by the I/O thread; one cancelled while it
        waits is skipped. `peer` names the sender in the log.
        """
        started = time.perf_counter() - decode_ms / 1e3  # when the request arrived, for the queue and total times
        # An int: a ZeroMQ peer chooses its identity (any bytes), so no bytes key would be safe from one.
        key = next(self._submissions)
        future: Future[ActReply] = Future()
        mode = self._act_mode(request)
        self._enqueue(Job(key, request, mode, time.time_ns(), started, decode_ms, peer, future))
        return future

    def start(self) -> str:
        if self._wake is not None:
            return self._endpoint
        try:
            if self._router is None:
                self._router = BoundRouter.bind(self._config)
            receiver, sender = socket.socketpair()
            for end in (receiver, sender):
                end.setblocking(False)
            self._wake = (receiver, sender)
            self._queue.set_wake(sender)
        except BaseException:
            self.close()
            raise
        self._endpoint = self._router.endpoint
        # An in-process endpoint reaches no controller: only this process's front ends (the HTTP one) submit.
        shown = "none (in-process only)" if self._endpoint.startswith("inproc://") else self._endpoint
        _LOG.info("serving platform=%s modes=%s endpoint=%s", self._platform.name, list(self._policies), shown)
        return self._endpoint

    def serve_forever(self) -> None:
        """Serves until `stop()`, answers every request taken in (see `_drain`), then closes the server. Raises
        `EngineError` once closed if it stopped because the policy worker died."""
        self.start()
        assert self._router is not None and self._wake is not None
        poller = zmq.Poller()
        poller.register(self._router.socket, zmq.POLLIN)
        poller.register(self._wake[0], zmq.POLLIN)
        self._idle.clear()
        try:
            # Daemonic: a policy call that outlives the shutdown window must not keep the process alive.
            worker = threading.Thread(target=self._work, name="policy-worker", daemon=True)
            worker.start()
            self._worker = worker  # only once started: `_drain` joins it
            self._refuse_acts_queued_before_serving()
            self._queue.accept()
            while not self._stop_requested and not self._stopping.is_set():
                self._poll(poller, _POLL_MS)
        finally:
            self._stopping.set()  # also after an error above: nothing more may be queued
            try:
                self._drain(poller)
            finally:
                self.close()
                self._idle.set()
                _LOG.info("stopped")
        if self._worker_failure is not None:
            failure = type(self._worker_failure).__name__
            raise EngineError(f"the policy worker died ({failure}); the server stopped, see its log")

    @property
    def accepting(self) -> bool:
        """True while `serve_forever` queues `act` requests."""
        return self._queue.accepting

    def wait_until_accepting(self, timeout_s: float) -> bool:
        """Waits until `serve_forever` queues `act` requests (those sent before are answered `overloaded`); False
        at the timeout, or at once when the server is stopping (it will not accept again)."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.wait_accepting(min(_POLL_MS / 1e3, max(0.0, deadline - time.monotonic()))):
            if self._stop_requested or self._stopping.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def stop(self, *, now: bool = False) -> None:
        """Asks `serve_forever` to return (within `_POLL_MS`); `now` also ends the shutdown window at once (the
        request being computed is answered `shutting_down` without waiting for it: an operator's second Ctrl-C).
        Only sets attributes, taking no lock, so it is safe in a signal handler, a second one included."""
        self._stop_now = self._stop_now or now
        self._stop_requested = True

    @property
    def stop_window_s(self) -> float:
        """How long `serve_forever` may take to return after `stop`: the shutdown window, the last replies' grace."""
        return self._config.shutdown_timeout_s + _REPLY_GRACE_S + FLUSH_MS / 1e3 + 1.0

    def close(self) -> None:
        """Closes the sockets: from the thread that served, or from any thread once `serve_forever` has returned."""
        self._queue.set_wake(None)  # no other thread writes a wake-up into a closed socket
        wake, self._wake = self._wake, None
        for end in wake or ():
            end.close()
        if self._router is not None:
            self._router.close()
            self._router = None

    def __enter__(self) -> PolicyServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
        if self._idle.wait(self.stop_window_s):
            self.close()  # sockets belong to the serving thread until serve_forever returns

    # --- I/O thread ------------------------------------------------------------------------------------------------

    def _poll(self, poller: zmq.Poller, timeout_ms: int) -> None:
        assert self._router is not None and self._wake is not None
        ready = dict(poller.poll(timeout_ms))
        if self._wake[0].fileno() in ready:  # pyzmq reports a plain socket by its file descriptor
            with contextlib.suppress(BlockingIOError):  # an unread wake-up would end every later poll at once
                self._wake[0].recv(_WAKE_BYTES)
        self._flush_outbox()
        if self._router.socket in ready:
            self._receive_requests()
        self._peer_log.tick()

    def _receive_requests(self) -> bool:
        """Handles what has arrived, up to a batch; True when it took a whole batch (more may be waiting)."""
        assert self._router is not None
        for _ in range(_RECEIVE_BATCH):
            try:
                identity, *frames = self._router.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return False
            self._handle(identity.bytes, frames)
        return True

    def _refuse_acts_queued_before_serving(self) -> None:
        """Answers what arrived before serving began: `serve` binds its socket before it loads the models (minutes
        for a 2B DiT), and an `act` sent meanwhile may have been given up by its sender long ago. Each is answered
        `overloaded` (until the queue accepts), which `PolicyClient` retries within its deadline."""
        for _ in range(_QUEUED_BATCHES):  # bounded: a peer sending without pause cannot hold serving back
            if not self._receive_requests():
                break

    def _handle(self, identity: bytes, frames: list[zmq.Frame]) -> None:
        receive_ns = time.time_ns()
        started = time.perf_counter()
        peer = identity.hex()
        request_id = None  # known once the header is read
        try:
            request = decode_request(frames, self._config.limits)
            request_id = request.request_id
            if isinstance(request, ActRequest):
                mode = self._act_mode(request)
                self._enqueue(Job(identity, request, mode, receive_ns, started, ms_since(started), peer))
                return
            reply: ServerMetadata | Pong | ModeSet
            if isinstance(request, MetadataRequest):
                reply = self._metadata(request.request_id)
            elif isinstance(request, PingRequest):
                reply = Pong(request.request_id, time.time_ns(), SERVER_VERSION)
            else:
                reply = self._set_mode(request)
        except Exception as failure:  # whatever a message does, the server answers it and keeps serving
            error = failure if isinstance(failure, MessageError) else _internal(failure, request_id)
            self._send(identity, ErrorReply.from_error(error).to_frames())
            self._peer_log.log(
                peer,
                logging.INFO if failure is error else logging.ERROR,
                "kind=error peer=%s request_id=%s code=%s field=%s total_ms=%.3f",
                peer,
                error.request_id or 0,  # as the reply says: 0 when the header could not be read
                error.code.value,
                peer_text(error.field),
                ms_since(started),
                exc_info=failure is not error,
            )
            return
        self._send(identity, reply.to_frames())
        level = logging.DEBUG if isinstance(reply, Pong) else logging.INFO
        _LOG.log(
            level,
            "kind=%s peer=%s request_id=%s total_ms=%.3f",
            request.kind.value,
            peer,
            request.request_id,
            ms_since(started),
        )

    def _act_mode(self, request: ActRequest) -> str:
        """The mode that will answer: the request's own, else the one in force when it arrived. Checks everything a
        request can be refused for before it waits for the worker."""
        with self._mode_lock:
            mode = request.mode or self._mode
        self._admission.check(request, mode)
        return mode

    def _enqueue(self, job: Job) -> None:
        if self._stop_requested or self._stopping.is_set():  # the queue closes within a poll: refused already
            raise shutting_down(job, "the server is shutting down")
        self._queue.put(job)

    def _flush_outbox(self) -> None:
        for answer in self._queue.answers():
            self._deliver(answer)

    def _deliver(self, answer: Answer) -> None:
        """Sends or resolves one answer; raises nothing, so one answer that cannot be sent loses no other."""
        job, outcome = answer.job, answer.outcome
        if job.future is None:
            assert isinstance(job.key, bytes), "a job without a future came from the ROUTER socket"
            frames, outcome = _encoded(job, outcome)
            self._send(job.key, frames)
            answer = dataclasses.replace(answer, outcome=outcome)  # for the log: what was sent
        elif not (job.future.running() or job.future.set_running_or_notify_cancel()):
            return  # its front end cancelled it while it waited: nobody is waiting for the answer
        elif isinstance(outcome, ActReply):
            job.future.set_result(outcome)
        else:
            job.future.set_exception(outcome)
        if answer.planning not in (None, PlanningOutcome.COMPLETE):
            self._planning_cut_short += 1
        _log_answer(answer, self._planning_cut_short)

    def _metadata(self, request_id: int) -> ServerMetadata:
        platform = self._platform
        with self._mode_lock:
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
        self._admission.check_mode(request.mode, request.request_id)
        with self._mode_lock:
            previous, self._mode = self._mode, request.mode
        _LOG.info("mode=%s previous_mode=%s", request.mode, previous)
        return ModeSet(request.request_id, request.mode, previous)

    def _send(self, identity: bytes, frames: list[OutFrame] | list[zmq.Frame]) -> None:
        """Sends a reply if its peer can take it; a reply that cannot be sent is logged and dropped, never raised."""
        assert self._router is not None
        try:
            self._router.socket.send_multipart([identity, *frames], zmq.NOBLOCK, copy=False)
            self._last_reply_at = time.monotonic()
        except zmq.Again:
            peer = identity.hex()
            self._peer_log.log(peer, logging.WARNING, "dropped a reply to peer=%s: it is not reading its socket", peer)
        except zmq.ZMQError as error:
            if error.errno == errno.EHOSTUNREACH:
                _LOG.debug("dropped a reply to peer=%s: it disconnected", identity.hex())
            else:
                _LOG.error("dropped a reply to peer=%s: %s", identity.hex(), error)

    def _drain(self, poller: zmq.Poller) -> None:
        """Before the sockets close, answers every request taken in: those waiting get `shutting_down`; the one
        running gets its result if it comes within the shutdown window, else `shutting_down` when the window ends
        (its result, should it come, is dropped). Then the connections stay open `_REPLY_GRACE_S` after the last reply.
        Meanwhile requests still arriving are answered (`act` refused)."""
        waiting = self._queue.close("the server stopped before this request ran")
        window = self._config.shutdown_timeout_s  # why the process may not exit at once: the request being computed
        computing = f"; the one being computed has up to {window:.1f} s" if self._queue.running else ""
        _LOG.info("stopping: %d waiting request(s) answered shutting_down%s", waiting, computing)
        self._poll_until(
            poller,
            time.monotonic() + self._config.shutdown_timeout_s,
            lambda: self._queue.running and not self._stop_now,
        )
        if self._stop_now:
            _LOG.info("stopping now (a second stop): the shutdown window is not waited out")
        if not self._answer_overdue() and self._worker is not None and not self._stop_now:
            self._worker.join(self._config.shutdown_timeout_s)  # it has nothing left to do but return
        if self._last_reply_at is not None:  # a fixed end: requests still arriving are answered, not waited for
            self._poll_until(poller, self._last_reply_at + _REPLY_GRACE_S, lambda: True)

    def _answer_overdue(self) -> bool:
        """Answers `shutting_down` to the request still being computed when the shutdown window ended, if any; its
        result, should it come, is dropped by the worker."""
        window = f"the {self._config.shutdown_timeout_s} s shutdown window"
        ended = "a second stop ended " + window if self._stop_now else window + " ended"
        detail = f"the policy was still computing it when {ended}"
        overdue = self._queue.take_back(lambda job: shutting_down(job, detail))
        self._flush_outbox()
        if overdue is None:
            return False
        _LOG.warning(
            "kind=act peer=%s request_id=%s obs_id=%s: still inferring when %s; answered shutting_down, its result "
            "will be dropped",
            overdue.peer,
            overdue.request.request_id,
            overdue.request.obs_id,
            ended,
        )
        return True

    def _poll_until(self, poller: zmq.Poller, deadline: float, condition: Callable[[], bool]) -> None:
        """Serves I/O while `condition()` holds, until the monotonic `deadline`."""
        while (left_ms := math.ceil((deadline - time.monotonic()) * 1e3)) > 0 and condition():
            self._poll(poller, min(_POLL_MS, left_ms))

    # --- worker thread ---------------------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            self._work_until_stopped()
        except BaseException as error:  # escaped `_run` (SystemExit, say): nothing would compute the queue any more
            _LOG.critical("the policy worker died; stopping the server", exc_info=True)
            self._worker_failure = error
            self._queue.take_back(_worker_died)
            self._stopping.set()  # the I/O thread answers whatever still waits, then closes

    def _work_until_stopped(self) -> None:
        while (job := self._queue.take(lambda: self._stop_requested)) is not None:
            if not self._queue.finish(self._run(job)):  # the shutdown window ended first and answered it
                _LOG.warning(
                    "kind=act peer=%s request_id=%s obs_id=%s mode=%s status=late_result_dropped total_ms=%.3f",
                    job.peer,
                    job.request.request_id,
                    job.request.obs_id,
                    job.mode,
                    ms_since(job.received_at),
                )

    def _run(self, job: Job) -> Answer:
        started = time.perf_counter()
        queue_ms = (started - job.received_at) * 1e3 - job.decode_ms
        request_id = job.request.request_id
        try:
            result = self._policies[job.mode].infer(action_query(job.request))
            timings_ms = {"decode": job.decode_ms, "queue": queue_ms, **result.timings_ms, "policy": ms_since(started)}
            reply = act_reply(
                job.request,
                result,
                self._platform,
                mode=job.mode,
                timings_ms=timings_ms,
                receive_ns=job.receive_ns,
                array_limit=CLIENT_ARRAY_BYTES if job.future is None else None,  # `submit`'s front ends decode nothing
            )
            planning = None if result.candidates is None else result.candidates.outcome
            return Answer(job, reply, planning=planning)
        except InputError as error:
            field = error.field if isinstance(error.field, str) else ""
            detail = str(error).removeprefix(f"{field}: ")  # the reply puts the field before its detail
            detail = detail or f"the {job.mode!r} policy refused the query without saying why"
            failure = MessageError(ErrorCode.INVALID_INPUT, field, detail, request_id)
        except Exception as error:  # a failing policy must not take the server down; details stay in our log
            _LOG.exception("policy mode=%s failed on obs_id=%s", job.mode, job.request.obs_id)
            detail = f"the {job.mode!r} policy failed ({type(error).__name__}); see the server log"
            failure = MessageError(ErrorCode.INTERNAL, "", detail, request_id)
        return Answer(job, failure, ms_since(started))


def _encoded(job: Job, outcome: ActReply | MessageError) -> tuple[list[OutFrame], ActReply | MessageError]:
    """The frames of an answer, and the answer they carry: a reply that cannot be encoded becomes an `internal`
    error, so its request is still answered once."""
    if isinstance(outcome, MessageError):
        return ErrorReply.from_error(outcome).to_frames(), outcome
    try:
        return outcome.to_frames(), outcome
    except Exception as error:
        _LOG.exception("could not encode the reply to request_id=%s", job.request.request_id)
        detail = f"the {job.mode!r} reply could not be encoded ({type(error).__name__}); see the server log"
        failure = MessageError(ErrorCode.INTERNAL, "", detail, job.request.request_id)
        return ErrorReply.from_error(failure).to_frames(), failure


def _internal(failure: Exception, request_id: int | None) -> MessageError:
    """The `internal` answer to a message whose handling failed unexpectedly (a defect: the log has its traceback),
    to its request when its header was read."""
    detail = f"the server failed on this message ({type(failure).__name__})"
    return MessageError(ErrorCode.INTERNAL, "", detail, request_id)


def _worker_died(job: Job) -> MessageError:
    detail = f"the {job.mode!r} policy worker died; see the server log"
    return MessageError(ErrorCode.INTERNAL, "", detail, job.request.request_id)


def _log_answer(answer: Answer, planning_cut_short: int) -> None:
    """The one log line of an `act`, once it is answered; a planning reply names how its query ended and how many
    planning queries so far were cut short by their deadline."""
    job, outcome = answer.job, answer.outcome
    if isinstance(outcome, ActReply):
        status = "ok " + " ".join(f"{stage}_ms={ms:.3f}" for stage, ms in outcome.timings_ms.items())
        if answer.planning is not None:
            status += f" planning={answer.planning.value} deadline_passed_total={planning_cut_short}"
    else:
        status = outcome.code.value + ("" if answer.policy_ms is None else f" policy_ms={answer.policy_ms:.3f}")
    _LOG.info(
        "kind=act peer=%s request_id=%s obs_id=%s mode=%s status=%s total_ms=%.3f",
        job.peer,
        job.request.request_id,
        job.request.obs_id,
        job.mode,
        status,
        ms_since(job.received_at),
    )


@contextlib.contextmanager
def serving_in_thread(server: PolicyServer) -> Iterator[str]:
    """Runs `server` on a background thread (for embedding it in a process, e.g. the demo); yields the bound endpoint,
    then stops it and waits for the thread up to its `stop_window_s`. Signal handling stays with the caller."""
    endpoint = server.start()
    thread = threading.Thread(target=server.serve_forever, name="policy-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not server.wait_until_accepting(0.05):
            if not thread.is_alive():
                raise EngineError("the policy server stopped before it began serving; see its log")
            if time.monotonic() > deadline:
                raise EngineError(f"the policy server did not begin serving within {_START_TIMEOUT_S:.0f} s")
        yield endpoint
    finally:
        server.stop()
        thread.join(server.stop_window_s)
        if thread.is_alive():
            _LOG.error("the policy server did not stop within %.1f s", server.stop_window_s)


def ms_since(start: float) -> float:
    """Milliseconds since the `time.perf_counter()` reading `start`."""
    return (time.perf_counter() - start) * 1e3
