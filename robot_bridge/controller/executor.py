"""Fixed-rate action-chunk executor: asynchronous prefetch, latest-wins, time-aligned chunk replacement.

The official Cosmos Policy ALOHA client queries only when its action queue is empty, so the robot stands
still for the whole inference. Here the control loop never waits for inference:

* Ticks run on absolute monotonic deadlines `epoch + k * period`; a tick that starts more than one
  period late skips the deadlines it missed (they are counted) instead of bursting to catch up, so
  the chunk timeline stays aligned with wall time.
* When at most `prefetch_threshold` actions of the chunk in hand remain, the loop captures an
  observation and hands it to a `ChunkSource`, which runs inference off the control thread.
* Observations are tagged with the tick that captured them (`obs_id`). A chunk computed from tick k
  is meant to start at tick k + 1, so when it arrives at tick t it replaces the rest of the old
  chunk from its action t - (k + 1) onwards: the arm moved on the old chunk meanwhile. Ticks of that
  span the arm held instead (no chunk yet, starved; deadlines skipped while it held too) are motion it
  never made: the chunk starts that many ticks later, so that it is not skipped ahead of the pose it
  was planned from. Replies no newer than the chunk in hand, or whose actions have all elapsed, are
  dropped.
* The adopted chunk is blended with the trajectory it replaces (`blending`: a short cross-fade by default, under
  which the commanded pose does not jump at chunk boundaries); every boundary's raw and commanded jump is recorded.
* The inference round trip is measured on every reply, and the prefetch point rises to cover it (with a margin).
  When the robot still runs out of actions (starves), or replies arrive after all their actions elapsed, a
  warning names the measured latency and the chunk horizon, at most every few seconds. Only one request is in
  flight, so a round trip over half the chunk horizon starves the robot whatever the prefetch point.
* A chunk not (N, dims) wide for the safety filter is dropped and warned about, at most every few seconds.
* With no valid action the `SafetyFilter` holds position; every command goes through it.

Threads: `run` executes on the caller's thread and owns the robot and all chunk state. Only the
`ChunkSource` worker runs elsewhere and touches nothing but the client. `stop` and `resume` may be
called from any thread.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from cosmos_edge.robot_bridge.controller.blending import BlendConfig, Boundary, ChunkBlender
from cosmos_edge.robot_bridge.controller.chunk_source import Chunk, ChunkRequest, ChunkSource, Clock, RequestFailed
from cosmos_edge.robot_bridge.controller.safety import Intervention, SafetyFilter
from cosmos_edge.robot_bridge.controller.throttle import Throttle
from cosmos_edge.robot_bridge.controller.ticks import (
    NO_CHUNK,
    TickLog,
    TickSummary,
    jitter_ms,
    precise_sleep,
    thread_priority,
)
from cosmos_edge.runtime.checks import check_integer, check_number, describe
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import Observation

_LOG = logging.getLogger(__name__)

Sleep = Callable[[float], None]  # seconds

MAX_RETRY_DELAY_S = 3600.0  # a longer wait is a mistake; a huge one would overflow the nanosecond arithmetic


class Robot(Protocol):
    """The robot as the control thread sees it. All three calls come from that one thread."""

    def observe(self) -> Observation:
        """The latest camera images and proprio; called once per inference request, so keep it cheap."""
        ...

    def current_qpos(self) -> np.ndarray:
        """Measured joint positions, shape (dims,)."""
        ...

    def command(self, qpos_target: np.ndarray) -> None:
        """Send one absolute joint-position target, shape (dims,)."""
        ...


@dataclass(frozen=True)
class ExecutorConfig:
    """Timing, prefetch and bookkeeping settings of `ChunkExecutor`.

    Args:
    control_rate_hz: command rate (default 25, the rate Cosmos Policy ALOHA was trained at: a chunk's actions are
        that far apart).
    prefetch_threshold: request the next chunk once at most this many actions of the current one remain
        (default 25 = half of a 50-action chunk); with `adaptive_prefetch` it rises to cover the measured round
        trip times `latency_margin`.
    adaptive_prefetch: raise the prefetch point to the measured inference round trip (default True).
    latency_margin: factor on the measured round trip for the adaptive prefetch point (default 1.5).
    starvation_warning_s: least time between two starvation warnings, and between two warnings of failed requests
        or of malformed chunks (default 5 s; those in between are logged at debug level and counted in the next
        warning).
    blend: how chunks are joined at boundaries (`blending.BlendConfig`; default an 8-tick cross-fade).
    retry_delay_s: wait after a failed request before the next one (default 0.1 s, at most an hour).
    record_capacity: tick records kept in the ring buffer (default 4096, 164 s at 25 Hz).
    realtime_priority: SCHED_FIFO priority (1-99) for the thread calling `run`, for its duration (default
        None: the normal scheduler). Needs Linux and CAP_SYS_NICE or an RLIMIT_RTPRIO; if refused, `run`
        warns and falls back to `nice`.
    nice: niceness (-20..19) for the thread calling `run` when SCHED_FIFO is not in use (default None:
        unchanged; negative values need CAP_SYS_NICE). Either keeps ticks on time when inference competes
        for the same cores. Both are restored after `run`, except a raised niceness without CAP_SYS_NICE (which
        cannot lower it back; a warning says so): give the controller a thread of its own then.
    """

    control_rate_hz: float = 25.0
    prefetch_threshold: int = 25
    retry_delay_s: float = 0.1
    record_capacity: int = 4096
    realtime_priority: int | None = None
    nice: int | None = None
    adaptive_prefetch: bool = True
    latency_margin: float = 1.5
    starvation_warning_s: float = 5.0
    blend: BlendConfig = field(default_factory=BlendConfig)

    def __post_init__(self) -> None:
        check_number("executor.control_rate_hz", self.control_rate_hz, 0, 1000, above_low=True)
        check_integer("executor.prefetch_threshold", self.prefetch_threshold, 0)
        check_number("executor.retry_delay_s", self.retry_delay_s, 0, MAX_RETRY_DELAY_S)
        check_integer("executor.record_capacity", self.record_capacity, 1)
        check_integer("executor.realtime_priority", self.realtime_priority, 1, 99, or_none=True)
        check_integer("executor.nice", self.nice, -20, 19, or_none=True)
        if not isinstance(self.adaptive_prefetch, bool):
            raise ConfigError(
                f"executor.adaptive_prefetch: expected True or False, got {describe(self.adaptive_prefetch)}"
            )
        check_number("executor.latency_margin", self.latency_margin, 1)
        check_number("executor.starvation_warning_s", self.starvation_warning_s, 0)
        if not isinstance(self.blend, BlendConfig):
            raise ConfigError(f"executor.blend: expected a BlendConfig, got {describe(self.blend)}")

    @property
    def period_ns(self) -> int:
        return round(1e9 / self.control_rate_hz)


@dataclass(frozen=True)
class ExecutorCounters:
    ticks: int = 0  # ticks executed
    missed_ticks: int = 0  # deadlines skipped because a tick started more than a period late
    requests: int = 0
    request_failures: int = 0
    chunks_adopted: int = 0
    dropped_older: int = 0  # reply not newer than the chunk in hand
    dropped_elapsed: int = 0  # every action of the reply was already in the past
    dropped_malformed: int = 0  # actions not (chunk, dims)
    dropped_stopped: int = 0  # arrived while the stop latch was set
    starved_ticks: int = 0  # held position after the first chunk because no action was left (not stopped)
    hold_ticks: int = 0  # ticks without an action of a chunk (before the first chunk, starved, or stopped)


def _starvation_advice(latency_ms: float | None, horizon_ms: float, config: ExecutorConfig) -> str:
    """Only one request is in flight: a chunk arrives with one round trip of its horizon spent, and the next takes
    another round trip, so once the round trip exceeds half the horizon no prefetch point keeps the robot moving."""
    if latency_ms is None or 2 * latency_ms <= horizon_ms:
        if not config.adaptive_prefetch:
            return "Request earlier: raise prefetch_threshold, or turn adaptive_prefetch on."
        margin = f"latency_margin (now {config.latency_margin:g}; `robot --latency-margin`)"
        period_ms = 1e3 / config.control_rate_hz
        # The prefetch point is the larger of prefetch_threshold and the round trip times the margin.
        if latency_ms == 0:  # replies come by the next tick (a simulation's clock): no margin moves the point
            return "Request earlier: raise prefetch_threshold (the round trip measures 0 ms on the executor's clock)."
        counts_from = None if latency_ms is None else config.prefetch_threshold * period_ms / latency_ms
        if counts_from is not None and config.latency_margin < counts_from:
            return (
                f"Request earlier: raise {margin} above {counts_from:.2g}, where the round trip starts to set the "
                f"prefetch point (prefetch_threshold, {config.prefetch_threshold}, sets it now)."
            )
        return f"Request earlier: raise {margin}, the factor on the measured round trip that sets the prefetch point."
    return (
        f"With one request in flight the robot starves whenever the round trip exceeds half the chunk horizon "
        f"({horizon_ms / 2:.0f} ms here), whatever the prefetch point: make inference faster (a faster mode or "
        "backend, fewer denoising steps), or the chunk horizon longer (longer chunks, or a lower control rate)."
    )


class ChunkExecutor:
    """Sends one safe command per tick from the newest valid chunk; see the module docstring."""

    def __init__(
        self,
        robot: Robot,
        source: ChunkSource,
        safety: SafetyFilter,
        config: ExecutorConfig,
        *,
        clock: Clock = time.monotonic_ns,
        sleep: Sleep = precise_sleep,
    ) -> None:
        self.config = config
        self._robot = robot
        self._source = source
        self._safety = safety
        self._clock = clock
        self._sleep = sleep
        self._period_ns = config.period_ns
        self._epoch_ns = clock()  # tick k is due at epoch + k * period, across runs
        self._dims = safety.config.dims
        self._log = TickLog(config.record_capacity)
        self._counts = {f.name: 0 for f in fields(ExecutorCounters)}
        self._chunk: Chunk | None = None  # None until the first chunk is adopted
        self._obs_floor = -1  # replies with obs_id <= floor are stale
        self._retry_at_ns = 0
        # Ticks the arm stood still without a chunk to follow (held ones, and deadlines skipped while it held), and
        # their count when the last request was captured, with its obs_id.
        self._stationary_ticks = 0
        self._stationary_at_capture = (NO_CHUNK, 0)
        # Stops are counted and a resume names the count it answers, so that a stop after it wins, without a lock a
        # signal handler could deadlock on.
        self._stops = 0
        # Resumes asked for (with the stop count the latest was asked at) and applied: counters written by different
        # threads and never cleared, so a resume asked while the control thread applies another is not lost.
        self._resumes = 0
        self._resume_of = 0
        self._resumes_applied = 0
        self._stop_reason = ""
        self._blender = ChunkBlender(config.blend, safety.config.gripper_indices)
        self._last_command: np.ndarray | None = None
        self._filter_held = 0  # ticks in a row the safety filter held the pose while the chunk had an action
        self._next_tick = 0  # the tick after the last one run
        self._pause_ended_ns = 0  # when the last pause between runs ended: replies to earlier requests elapsed in it
        self._latency_ns: float | None = None  # smoothed inference round trip (capture to receipt)
        self._chunk_length = 0  # of the last adopted chunk
        self._starved_warnings = Throttle(config.starvation_warning_s)
        self._failure_warnings = Throttle(config.starvation_warning_s)
        self._malformed_warnings = Throttle(config.starvation_warning_s)
        self._late_warnings = Throttle(config.starvation_warning_s)
        self._last_failure: RequestFailed | None = None  # of the requests since the last chunk adopted, the last
        self._failures_since_chunk = 0
        self._in_flight_since_ns: int | None = None  # capture time of the request the source has not answered yet

    @property
    def counters(self) -> ExecutorCounters:
        return ExecutorCounters(**self._counts)

    def records(self) -> np.ndarray:
        """Per-tick records (`TICK_DTYPE`), oldest first, at most `record_capacity`."""
        return self._log.snapshot()

    def boundaries(self) -> list[Boundary]:
        """Every chunk boundary (raw and commanded jump, safety interventions), oldest first; the last one as
        collected so far while its window is open."""
        return self._blender.boundaries()

    @property
    def latency_ms(self) -> float | None:
        """The smoothed inference round trip (observation capture to reply), None before the first reply."""
        return None if self._latency_ns is None else self._latency_ns / 1e6

    @property
    def prefetch_threshold(self) -> int:
        """The prefetch point in use: the configured one, raised to cover the measured round trip."""
        base = self.config.prefetch_threshold
        if not self.config.adaptive_prefetch or self._latency_ns is None:
            return base
        needed = self._latency_ns * self.config.latency_margin / self._period_ns  # inf for a huge margin
        return max(base, math.ceil(min(needed, max(self._chunk_length - 1, 0))))

    def stop(self, reason: str = "stop command") -> None:
        """Latch a stop: hold position and stop requesting chunks until `resume`. A resume still pending (asked for
        before this stop, not yet applied by a tick) is cancelled: the later stop wins. Thread-safe and lock-free, so a
        signal handler may call it while `run` is on the same thread."""
        self._stop_reason = reason
        self._stops += 1  # voids a resume still pending
        self._safety.stop(reason)

    def resume(self) -> None:
        """Clear the stop at the next tick, unless another stop comes first; the chunk in hand and replies to older
        requests are discarded (they answered the pre-stop situation). Does nothing when the stop latch is not set, so
        a resume without a stop keeps the chunk in hand. Thread-safe."""
        if self._safety.stopped:
            self._resume_of = self._stops
            self._resumes += 1  # after `_resume_of`: the control thread reads them in the other order

    def run(
        self,
        num_ticks: int | None = None,
        *,
        duration_s: float | None = None,
        until: Callable[[], bool] | None = None,
    ) -> TickSummary:
        """Run for `num_ticks` control periods or `duration_s` seconds (at most one of them) on this thread, and
        with `until` only as long as it returns False (asked before every tick; without a length, that is the end).

        Periods whose deadline was skipped count towards `num_ticks`, so a run always spans the same time.
        Returns the summary of this run's ticks; `records()` has the details.
        """
        both, neither = None not in (num_ticks, duration_s), num_ticks is None and duration_s is None
        if both or (neither and until is None):
            raise ConfigError(f"executor.run: give num_ticks or duration_s, or until; got {num_ticks=} {duration_s=}")
        check_integer("executor.run.num_ticks", num_ticks, 0, or_none=True)
        if duration_s is not None:
            check_number("executor.run.duration_s", duration_s, 0, 1e9)  # 1e9 s: any run; its ticks are an int
            num_ticks = round(duration_s * self.config.control_rate_hz)
        now = self._clock()
        # A run that begins less than a period after its next tick's deadline runs that tick late, as the loop runs a
        # late tick; once a whole period more has passed, the ticks between the runs are a pause, not starvation, and
        # the run starts at the first deadline not yet passed.
        paused = (now - self._epoch_ns) // self._period_ns > self._next_tick
        tick = -(-(now - self._epoch_ns) // self._period_ns) if paused else self._next_tick
        end_tick = None if num_ticks is None else tick + num_ticks
        before = self.counters
        if paused:
            self._pause_ended_ns = now
            self._blender.end_boundary()  # the next command does not continue the trajectory of the last one
            # As after a resume, the chunk in hand and replies to requests captured before the pause answered the
            # situation before it: this run holds until a chunk of its own comes, and fades it in. The rig may have
            # moved the arms meanwhile (an episode reset): the filter then holds the pose measured, not the last run's.
            self._chunk, self._obs_floor = None, self._next_tick - 1
            self._safety.restart()
        with thread_priority(self.config.realtime_priority, self.config.nice):
            self._loop(tick, end_tick, until or (lambda: False))
        self._safety.announce_stop()  # a stop latched by a signal that also ended the run: said here, not there
        summary = self.summary(since=before)
        _LOG.info("executor: run finished: %s; %s", summary, self.counters)
        return summary

    def summary(self, since: ExecutorCounters | None = None) -> TickSummary:
        """The ticks since the counters `since` (default: every tick so far): counts from the counters, jitter from
        the records kept of them (the last `record_capacity`)."""
        since = since or ExecutorCounters()
        now = self.counters
        ran = now.ticks - since.ticks
        records = self.records()
        return TickSummary(
            ran,
            now.missed_ticks - since.missed_ticks,
            now.hold_ticks - since.hold_ticks,
            *jitter_ms(records[max(0, len(records) - ran) :]),
        )

    def _loop(self, tick: int, end_tick: int | None, until: Callable[[], bool]) -> None:
        while (end_tick is None or tick < end_tick) and not until():
            deadline = self._epoch_ns + tick * self._period_ns
            now = self._clock()
            if now < deadline:
                self._sleep((deadline - now) / 1e9)
                now = self._clock()
            latest_due = (now - self._epoch_ns) // self._period_ns
            if end_tick is not None:
                latest_due = min(latest_due, end_tick - 1)
            missed = max(0, latest_due - tick)
            if missed:
                self._warn_late(tick, now, (now - deadline) / 1e6, missed)
                tick = latest_due
                deadline = self._epoch_ns + tick * self._period_ns
                self._counts["missed_ticks"] += missed
            self._step(tick, deadline, now, missed)
            tick += 1

    def _step(self, tick: int, deadline: int, wake: int, missed: int) -> None:
        held_skipped = self._held_among_skipped(tick, missed)
        self._stationary_ticks += held_skipped
        if self._resumes != self._resumes_applied:
            self._resumes_applied, resume_of = self._resumes, self._resume_of
            if resume_of == self._stops:
                self._safety.clear_stop()
                if self._stops != resume_of:  # a stop came while the latch was being cleared: it stands
                    self._safety.stop(self._stop_reason)
                else:  # requests captured before this tick answered the pre-stop situation
                    self._chunk, self._obs_floor = None, tick - 1
        adopted = self._receive(tick, missed)
        chunk = self._chunk
        # Ticks the chunk ran on without the commands following it: skipped ones (its index jumped; not those before
        # its first action, held), and ones the safety filter held (a non-finite reading or action). Fade into it
        # rather than command their motion at once.
        lagged = missed - held_skipped + self._filter_held
        if lagged and not adopted and chunk is not None and self._last_command is not None:
            self._blender.rejoin(tick, lagged, chunk.actions, chunk.first_tick, self._last_command)

        stopped = self._safety.stopped  # the filter holds the pose whatever the chunk says: a held tick
        action, obs_id, index = (None, NO_CHUNK, NO_CHUNK) if stopped else self._action_at(tick)
        starved = action is None and self._chunk is not None and not stopped
        if action is None:  # the ticks the safety filter held before the chunk ran out are never caught up on: those
            # after the last capture, as the ones before are in its observation
            self._stationary_ticks += min(self._filter_held, max(0, tick - 1 - self._stationary_at_capture[0]))
        if starved:
            self._warn_starved(tick, "no action left: holding position")
        target = self._blender.target(tick, action, self._last_command)
        safe = self._safety.apply(target, self._robot.current_qpos())
        self._robot.command(safe.qpos)
        command_ns = self._clock()
        # Counted once the command went out, as `ticks` is: a run that ends in the robot's call counts neither.
        self._counts["hold_ticks"] += int(action is None)
        self._stationary_ticks += int(action is None)
        self._counts["starved_ticks"] += int(starved)
        held = action is not None and Intervention.HELD in safe.flags
        self._filter_held = self._filter_held + 1 if held else 0
        intervened = bool(safe.flags & (Intervention.RATE_LIMITED | Intervention.CLAMPED))
        self._blender.observe_command(tick, safe.qpos, intervened)
        self._last_command = safe.qpos

        requested = self._maybe_request(tick, command_ns)
        self._log.append(tick, deadline, wake, command_ns, missed, obs_id, index, safe.flags.value, adopted, requested)
        self._counts["ticks"] += 1
        self._next_tick = tick + 1

    def _receive(self, tick: int, missed: int) -> bool:
        """Takes the chunk source's outcome, if any; a chunk adopted after `missed` skipped ticks fades in."""
        outcome = self._source.poll()
        if outcome is None:
            return False
        self._in_flight_since_ns = None
        if isinstance(outcome, RequestFailed):
            self._counts["request_failures"] += 1
            self._last_failure, self._failures_since_chunk = outcome, self._failures_since_chunk + 1
            self._retry_at_ns = self._clock() + round(self.config.retry_delay_s * 1e9)
            self._warn_request_failed(outcome)
            return False
        # Round trip as the control loop sees it: from capture to the tick that received the outcome. A request made
        # before a pause between runs may have been answered during it: no measure of the round trip.
        if outcome.capture_ns >= self._pause_ended_ns:
            latency = self._clock() - outcome.capture_ns
            self._latency_ns = latency if self._latency_ns is None else 0.7 * self._latency_ns + 0.3 * latency
        outcome = self._after_holds(outcome)
        reason = self._drop_reason(outcome, tick)
        if reason in (None, "dropped_elapsed"):  # a well-formed reply to a current request: its length is the horizon
            self._chunk_length = len(outcome.actions)
        if reason is not None:
            self._counts[reason] += 1
            _LOG.debug("executor: %s chunk from obs %d at tick %d", reason, outcome.obs_id, tick)
            if reason == "dropped_malformed":
                self._warn_malformed(outcome)
            elif reason == "dropped_elapsed" and outcome.capture_ns >= self._pause_ended_ns:  # else: the pause
                self._warn_starved(tick, f"the reply to obs {outcome.obs_id} came after all its actions elapsed")
            return False
        old = self._chunk
        self._blender.switch(
            tick,
            outcome.actions,
            outcome.first_tick,
            None if old is None else old.actions,
            0 if old is None else old.first_tick,
            self._last_command,
            skipped=missed,
        )
        self._chunk, self._obs_floor = outcome, outcome.obs_id
        self._counts["chunks_adopted"] += 1
        self._last_failure, self._failures_since_chunk = None, 0
        return True

    def _held_among_skipped(self, tick: int, missed: int) -> int:
        """How many of the `missed` deadlines before `tick` the arm held through: all of them when the chunk in hand
        has no action for `tick` (none in hand, it ran out, or stopped: the skipped actions are never commanded),
        else those before its first action (`rejoin` carries the motion of the others)."""
        chunk = self._chunk
        if (
            chunk is None
            or self._safety.stopped
            or not chunk.first_tick <= tick < chunk.first_tick + len(chunk.actions)
        ):
            return missed
        return min(missed, max(0, chunk.first_tick - (tick - missed)))

    def _after_holds(self, chunk: Chunk) -> Chunk:
        """`chunk` starting later by the ticks the arm held since its observation was captured (see the module
        docstring)."""
        obs_id, stationary = self._stationary_at_capture
        held = self._stationary_ticks - stationary if chunk.obs_id == obs_id else 0
        return dataclasses.replace(chunk, first_tick=chunk.first_tick + held) if held else chunk

    def _warn_late(self, tick: int, now: int, late_ms: float, missed: int) -> None:
        """Ticks that start a whole period late are skipped (a run keeps its length): the robot's own calls, or a
        busy machine, take longer than the period. Warned at once, then once per interval."""
        skipped = self._late_warnings.due(now)
        log = _LOG.debug if skipped is None else _LOG.warning
        log(
            "executor: tick %d started %.1f ms late; skipping %d tick(s) (%d skipped so far): the robot's observe "
            "and command, or this machine, cannot keep %.0f Hz",
            tick,
            late_ms,
            missed,
            self._counts["missed_ticks"] + missed,
            self.config.control_rate_hz,
        )

    def _warn_request_failed(self, failure: RequestFailed) -> None:
        """A failed request is retried every `retry_delay_s`: one that fails at once must not flood the log."""
        failures = self._failure_warnings.due(self._clock())
        if failures is None:
            _LOG.debug("executor: request for obs %d failed: %r", failure.obs_id, failure.error)
            return
        _LOG.warning(
            "executor: request for obs %d failed: %r (%d failed requests since the last such warning)",
            failure.obs_id,
            failure.error,
            failures,
        )

    def _warn_malformed(self, chunk: Chunk) -> None:
        """A chunk of the wrong shape is a configuration error (the policy's action width against the robot's
        `SafetyConfig`) that recurs with every reply while the robot holds: warn at once, then once per interval."""
        dropped = self._malformed_warnings.due(self._clock())
        if dropped is None:
            return
        _LOG.warning(
            "executor: dropped the chunk for obs %d: its actions have shape %s, expected (N, %d) with N >= 1 (the "
            "safety filter's dims; %d malformed chunks dropped since the last such warning, this one included). The "
            "robot holds position while no chunk fits: check that the policy's action dims match its SafetyConfig.",
            chunk.obs_id,
            chunk.actions.shape,
            self._dims,
            dropped,
        )

    def _warn_starved(self, tick: int, what: str) -> None:
        events = self._starved_warnings.due(self._clock())
        if events is None:
            _LOG.debug("executor: starved at tick %d (%s)", tick, what)
            return
        since = f" ({events} starvation events since the last warning)" if events > 1 else ""
        horizon_ms = self._chunk_length * self._period_ns / 1e6
        latency = "unknown" if self.latency_ms is None else f"{self.latency_ms:.0f} ms"
        if self._last_failure is not None and self.latency_ms is not None:
            latency += " (the last that succeeded)"
        _LOG.warning(
            "executor: starved at tick %d (%s): inference round trip %s vs chunk horizon %.0f ms (%d actions at "
            "%.0f Hz), prefetch at %d remaining; %d starved ticks before this one%s. %s",
            tick,
            what,
            latency,
            horizon_ms,
            self._chunk_length,
            self.config.control_rate_hz,
            self.prefetch_threshold,
            self._counts["starved_ticks"],
            since,
            self._starvation_cause(horizon_ms),
        )

    def _starvation_cause(self, horizon_ms: float) -> str:
        if self._last_failure is not None:  # no round trip to speak of: the requests themselves fail
            error = self._last_failure.error
            return (
                f"The {self._failures_since_chunk} request(s) since the last chunk failed, the last with "
                f"{type(error).__name__}: {error} (check that the server is up and answers within the client's timeout)"
            )
        if self._in_flight_since_ns is not None:
            waiting_ms = (self._clock() - self._in_flight_since_ns) / 1e6
            # Far past the round trips measured (or, before any, past the horizon): not slow inference, no answer.
            usual_ms = horizon_ms if self.latency_ms is None else max(3 * self.latency_ms, 1e3)
            if waiting_ms > usual_ms:
                past = "the chunk horizon (no round trip measured yet)" if self.latency_ms is None else "the round trip"
                return (
                    f"The request in flight has waited {waiting_ms:.0f} ms for its answer, well past {past}: the "
                    "server is not answering it (stopped, hung or unreachable; the client gives up at its timeout)."
                )
        return _starvation_advice(self.latency_ms, horizon_ms, self.config)

    def _drop_reason(self, chunk: Chunk, tick: int) -> str | None:
        if self._safety.stopped:
            return "dropped_stopped"
        if chunk.actions.ndim != 2 or chunk.actions.shape[1] != self._dims or len(chunk.actions) == 0:
            return "dropped_malformed"
        if chunk.obs_id <= self._obs_floor:
            return "dropped_older"
        if tick - chunk.first_tick >= len(chunk.actions):
            return "dropped_elapsed"
        return None

    def _action_at(self, tick: int) -> tuple[np.ndarray | None, int, int]:
        """(action or None, its chunk's obs_id, its index) for `tick`; NO_CHUNK ids when there is none."""
        if self._chunk is None:
            return None, NO_CHUNK, NO_CHUNK
        index = tick - self._chunk.first_tick
        if not 0 <= index < len(self._chunk.actions):
            return None, NO_CHUNK, NO_CHUNK
        return self._chunk.actions[index], self._chunk.obs_id, index

    def _remaining_after(self, tick: int) -> int:
        if self._chunk is None:
            return 0
        return max(0, len(self._chunk.actions) - (tick - self._chunk.first_tick) - 1)

    def _maybe_request(self, tick: int, now: int) -> bool:
        if self._safety.stopped or self._source.busy or now < self._retry_at_ns:
            return False
        if self._remaining_after(tick) > self.prefetch_threshold:
            return False
        # Captured after this tick's command (which is also when the adapters read their sensors), so
        # action 0 of the answer belongs to the next tick.
        observation = self._robot.observe()
        if not np.isfinite(observation.proprio).all():  # the server would refuse it; the next tick reads again
            return False
        self._source.submit(
            ChunkRequest(
                obs_id=tick,
                first_tick=tick + 1,
                capture_ns=now,
                capture_wall_ns=time.time_ns(),
                observation=observation,
            )
        )
        self._counts["requests"] += 1
        self._in_flight_since_ns = now
        self._stationary_at_capture = (tick, self._stationary_ticks)
        return True
