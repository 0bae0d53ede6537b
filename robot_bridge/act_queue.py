"""The `act` requests a policy server has taken in and not answered yet, and the answers not delivered yet.

Every job is answered exactly once: whoever takes it out of the queue (the worker, a newer observation from the same
controller, the shutdown) or takes the running one back (the worker, or the end of the shutdown window) posts its
answer, under the queue's lock, to the outbox the I/O thread delivers. Taking a job and posting its answer are one
step, so the shutdown can never close the socket between the two.

The queue keeps at most one waiting job per key (a controller's ROUTER identity): a newer observation replaces the one
still waiting, which is answered `superseded`. Keys are served in arrival order, at most `max_pending` wait at once,
and a job whose deadline (`timeout_ms`) passed while it waited is answered `expired` instead of run.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from cosmos_edge.robot_bridge.protocol import ActReply, ActRequest, ErrorCode, MessageError
from cosmos_edge.runtime.policy.api import PlanningOutcome

_STARTING = "arrived while the server was starting (loading its models); ask again"


@dataclass(frozen=True)
class Job:
    key: bytes | int  # in the queue: a controller's ROUTER identity, or a `submit` number (never a ZeroMQ peer's)
    request: ActRequest
    mode: str
    receive_ns: int  # wall clock, reported to the controller
    received_at: float  # perf_counter, for durations and the deadline
    decode_ms: float
    peer: str  # for the log
    future: Future[ActReply] | None = None  # set for `submit`: the reply goes there instead of the ROUTER socket


@dataclass(frozen=True)
class Answer:
    job: Job
    outcome: ActReply | MessageError
    policy_ms: float | None = None  # for a failure of the policy, for the log
    planning: PlanningOutcome | None = None  # how a planning query ended, whether or not its reply says so


class ActQueue:
    """Thread-safe. Refuses jobs (`overloaded`) until `accept()`, and for good (`shutting_down`) after `close()`."""

    def __init__(self, max_pending: int) -> None:
        self._max_pending = max_pending
        self._lock = threading.Lock()  # guards everything below and writing to `_wake`
        self._work_ready = threading.Condition(self._lock)
        self._pending: OrderedDict[bytes | int, Job] = OrderedDict()
        self._running: Job | None = None  # taken by the worker; answered by whoever takes it back
        self._outbox: deque[Answer] = deque()
        self._wake: socket.socket | None = None  # written to once per answer posted, to wake the I/O thread
        self._accepting = threading.Event()
        self._closed = False

    def set_wake(self, sender: socket.socket | None) -> None:
        """The non-blocking socket a byte is sent on whenever an answer is posted; None once it is closed."""
        with self._lock:
            self._wake = sender

    def accept(self) -> None:
        """Accepts jobs from now on, unless the queue is closed (for good)."""
        with self._lock:
            if not self._closed:
                self._accepting.set()

    @property
    def accepting(self) -> bool:
        return self._accepting.is_set()

    def wait_accepting(self, timeout_s: float) -> bool:
        return self._accepting.wait(timeout_s)

    def put(self, job: Job) -> None:
        """Queues `job`, answering the one it replaces `superseded`; `MessageError` when it is refused."""
        with self._work_ready:
            if self._closed:  # nothing would run it: the worker stops, or is gone
                raise MessageError(ErrorCode.SHUTTING_DOWN, "", "the server is shutting down", job.request.request_id)
            if not self._accepting.is_set():  # it arrived while the models loaded: its sender may be long gone
                raise MessageError(ErrorCode.OVERLOADED, "", _STARTING, job.request.request_id)
            replaced = self._pending.get(job.key)
            if replaced is None and not self._has_room():
                detail = f"{self._max_pending} controllers are already waiting; retry later"
                raise MessageError(ErrorCode.OVERLOADED, "", detail, job.request.request_id)
            self._pending[job.key] = job  # a replacement keeps its controller's place in line
            self._work_ready.notify()
            if replaced is not None:
                detail = f"observation {replaced.request.obs_id} replaced by {job.request.obs_id} before it ran"
                superseded = MessageError(ErrorCode.SUPERSEDED, "obs_id", detail, replaced.request.request_id)
                self._post(Answer(replaced, superseded))

    def take(self, stop_requested: Callable[[], bool]) -> Job | None:
        """The worker's next job, marked running (blocks until there is one); None once the queue is closed or
        `stop_requested()`: what still waits is answered by `close`."""
        with self._work_ready:
            while True:
                while not self._pending and not self._closed:
                    self._work_ready.wait()
                if self._closed or stop_requested():
                    return None
                job = self._pending.popitem(last=False)[1]
                if (expired := _expiry(job, time.perf_counter())) is not None:
                    self._post(Answer(job, expired))
                elif job.future is None or job.future.set_running_or_notify_cancel():
                    self._running = job
                    return job
                # else its front end cancelled it while it waited: nobody to answer

    def finish(self, answer: Answer) -> bool:
        """Posts the worker's answer to the running job; False when it was taken back first (`take_back`)."""
        with self._lock:
            if self._running is not answer.job:
                return False
            self._running = None
            self._post(answer)
            return True

    def take_back(self, failure: Callable[[Job], MessageError]) -> Job | None:
        """Answers the running job, if any, with `failure(job)` without waiting for the worker; returns it."""
        with self._lock:
            running, self._running = self._running, None
            if running is not None:
                self._post(Answer(running, failure(running)))
            return running

    @property
    def running(self) -> bool:
        with self._lock:
            return self._running is not None

    def close(self, detail: str) -> int:
        """Refuses every later job, answers the waiting ones `shutting_down` with `detail` and wakes the worker (it
        returns once its running job, if any, is done); returns how many were waiting."""
        with self._work_ready:
            self._closed = True
            self._accepting.clear()
            waiting = len(self._pending)
            for job in self._pending.values():
                self._post(Answer(job, shutting_down(job, detail)))
            self._pending.clear()
            self._work_ready.notify_all()
            return waiting

    def answers(self) -> list[Answer]:
        """Takes the answers posted so far, oldest first, for the I/O thread to deliver."""
        with self._lock:
            answers = list(self._outbox)
            self._outbox.clear()
            return answers

    def _has_room(self) -> bool:
        """Whether one more key may wait (lock held). Those past their deadline are answered `expired` first, and
        submitted jobs their front end cancelled (an HTTP client gone) are dropped: senders that gave up must not hold
        places a live controller needs."""
        if len(self._pending) >= self._max_pending:
            now = time.perf_counter()
            for key, job in list(self._pending.items()):
                if job.future is not None and job.future.cancelled():  # nobody to answer
                    del self._pending[key]
                elif (expired := _expiry(job, now)) is not None:
                    del self._pending[key]
                    self._post(Answer(job, expired))
        return len(self._pending) < self._max_pending

    def _post(self, answer: Answer) -> None:
        """Hands an answer to the I/O thread (lock held)."""
        self._outbox.append(answer)
        if self._wake is not None:
            with contextlib.suppress(BlockingIOError):  # the pipe is full: the I/O thread has wake-ups enough
                self._wake.send(b"\0")


def _expiry(job: Job, now: float) -> MessageError | None:
    """The `expired` answer of a job whose deadline has passed; None while it may still run."""
    timeout_ms = job.request.timeout_ms
    waited_ms = (now - job.received_at) * 1e3
    if timeout_ms is None or waited_ms <= timeout_ms:
        return None
    detail = f"expected to start within {timeout_ms} ms, waited {waited_ms:.0f} ms; not computed"
    return MessageError(ErrorCode.EXPIRED, "timeout_ms", detail, job.request.request_id)


def shutting_down(job: Job, detail: str) -> MessageError:
    return MessageError(ErrorCode.SHUTTING_DOWN, "", detail, job.request.request_id)
