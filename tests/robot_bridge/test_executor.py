"""ChunkExecutor on a fake clock with a deterministic chunk source, plus short real-time runs with the worker thread."""

import dataclasses
import functools
import itertools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pytest

from cosmos_edge.robot_bridge.controller import ticks
from cosmos_edge.robot_bridge.controller.blending import BlendConfig, BlendScheme, ChunkBlender, summarize_boundaries
from cosmos_edge.robot_bridge.controller.chunk_source import (
    ActParams,
    Chunk,
    ChunkRequest,
    Outcome,
    RequestFailed,
    ThreadedChunkSource,
    request_chunk,
)
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import (
    VX300S_JOINT_LOWER,
    VX300S_JOINT_UPPER,
    Intervention,
    SafetyConfig,
    SafetyFilter,
)
from cosmos_edge.robot_bridge.controller.ticks import NO_CHUNK, precise_sleep
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import Observation

START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
PARAMS = ActParams(instruction="put the peg in the socket")


def encode(obs_id: int, chunk: int) -> np.ndarray:
    """Actions whose waist angle carries the obs_id and forearm roll the index, in mrad."""
    actions = np.tile(START, (chunk, 1)).astype(np.float32)
    actions[:, 0] = obs_id * 1e-3
    actions[:, 3] = np.arange(chunk) * 1e-3
    return actions


def decode(qpos: np.ndarray) -> tuple[int, int]:
    return round(qpos[0] * 1e3), round(qpos[3] * 1e3)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


class FakeRobot:
    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.qpos = START.copy()
        self.commands: list[np.ndarray] = []
        self.observations = 0
        self.on_command: Callable[[int], None] = lambda n: None

    def observe(self) -> Observation:
        self.observations += 1
        return Observation(images={"cam_high": np.zeros((4, 4, 3), np.uint8)}, proprio=self.qpos.astype(np.float32))

    def current_qpos(self) -> np.ndarray:
        return self.qpos.copy()

    def command(self, qpos_target: np.ndarray) -> None:
        self.commands.append(qpos_target.copy())
        self.qpos = qpos_target.copy()  # perfect tracking
        self.on_command(len(self.commands))


class FakeTimeout(TimeoutError):
    pass


@dataclass(frozen=True)
class Reply:
    obs_id: int
    actions: np.ndarray
    value: float = 0.5
    timings_ms: Mapping[str, float] = field(default_factory=lambda: {"total": 1.0})


class FakeClient:
    def __init__(self, chunk: int, latency_s: float = 0.0) -> None:
        self.chunk = chunk
        self.latency_s = latency_s
        self.down = False
        self.transform: Callable[[np.ndarray], np.ndarray] = lambda a: a
        self.calls: list[int] = []
        self.capture_times: list[int] = []

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
    ) -> Reply:
        assert instruction == PARAMS.instruction and observation.proprio.shape == (14,)
        self.calls.append(obs_id)
        self.capture_times.append(capture_time_ns)
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.down:
            raise FakeTimeout("no reply")
        return Reply(obs_id, self.transform(encode(obs_id, self.chunk)))


class LatencySource:
    """Deterministic ChunkSource: calls the client at submit time, delivers the outcome `latency` later."""

    def __init__(self, client: FakeClient, clock: FakeClock, latency_ticks: int, timeout_ticks: int = 10) -> None:
        self._client, self._clock = client, clock
        self._latency_ns = latency_ticks * PERIOD_NS
        self._timeout_ns = timeout_ticks * PERIOD_NS
        self._pending: tuple[int, Outcome] | None = None

    @property
    def busy(self) -> bool:
        return self._pending is not None  # until its outcome is polled, as `ThreadedChunkSource`

    def submit(self, request: ChunkRequest) -> None:
        assert self._pending is None
        outcome = request_chunk(self._client, PARAMS, request)
        delay = self._timeout_ns if isinstance(outcome, RequestFailed) else self._latency_ns
        self._pending = (request.capture_ns + delay, outcome)

    def poll(self) -> Outcome | None:
        if self._pending is None or self._clock() < self._pending[0]:
            return None
        outcome, self._pending = self._pending[1], None
        return outcome


class ReplaySource(LatencySource):
    """Also re-delivers the oldest chunk after each new delivery, as a late duplicate would arrive."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.first: Outcome | None = None
        self._replay = False

    def poll(self) -> Outcome | None:
        outcome = super().poll()
        if outcome is not None:
            self.first = self.first or outcome
            self._replay = outcome is not self.first
            return outcome
        if self._replay:
            self._replay = False
            return self.first
        return None


RATE_HZ = 25.0
PERIOD_NS = 40_000_000
HARD_SWITCH = BlendConfig(BlendScheme.NONE)


def make(
    chunk: int = 20,
    threshold: int = 8,
    latency_ticks: int = 3,
    source_cls: type[LatencySource] = LatencySource,
    robot_cls: Callable[[FakeClock], FakeRobot] = FakeRobot,
    **config: object,
) -> tuple[ChunkExecutor, FakeRobot, FakeClient, FakeClock]:
    clock = FakeClock()
    robot = robot_cls(clock)
    client = FakeClient(chunk)
    source = source_cls(client, clock, latency_ticks)
    # The scheduling tests decode exact actions: a hard switch and a fixed prefetch point unless a test asks.
    settings: dict[str, object] = {"blend": HARD_SWITCH, "adaptive_prefetch": False, **config}
    cfg = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=threshold, **settings)  # type: ignore[arg-type]
    executor = ChunkExecutor(robot, source, SafetyFilter(SafetyConfig()), cfg, clock=clock, sleep=clock.sleep)
    return executor, robot, client, clock


def expected_schedule(num_ticks: int, chunk: int, threshold: int, latency: int) -> list[tuple[int, int]]:
    """(obs_id, index) per tick, NO_CHUNK pairs for holds, worked out by hand from the executor rules."""
    out: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None  # (obs_id, first_tick)
    in_flight: int | None = None
    holds = holds_at_capture = 0
    for t in range(num_ticks):
        if in_flight is not None and t == in_flight + latency:
            # Meant to start at the tick after its capture, later by the ticks the arm held since.
            current, in_flight = (in_flight, in_flight + 1 + holds - holds_at_capture), None
        index = chunk if current is None else t - current[1]
        if current is None or index >= chunk:
            out.append((NO_CHUNK, NO_CHUNK))
            holds += 1
        else:
            out.append((current[0], index))
        remaining = max(0, chunk - index - 1)
        if in_flight is None and remaining <= threshold:
            in_flight, holds_at_capture = t, holds
    return out


def executed(executor: ChunkExecutor) -> list[tuple[int, int]]:
    r = executor.records()
    return list(zip(r["chunk_obs_id"].tolist(), r["action_index"].tolist(), strict=True))


def test_time_aligned_replacement_follows_the_schedule() -> None:
    executor, robot, client, _ = make(chunk=20, threshold=8, latency_ticks=3)
    summary = executor.run(60)
    got = executed(executor)
    assert got == expected_schedule(60, chunk=20, threshold=8, latency=3)
    # Worked example: obs 0 answers at tick 3; the arm held since, so its chunk starts there, at action 0 (not at 2:
    # actions 0 and 1 are motion the arm never made).
    assert got[:4] == [(NO_CHUNK, NO_CHUNK)] * 3 + [(0, 0)]
    # Obs 14 answers at tick 17 and replaces chunk 0 (at its index 14, 5 left) with its own index 2: the arm moved
    # on chunk 0 meanwhile.
    assert got[16:18] == [(0, 13), (14, 2)]
    # The robot received exactly those actions.
    for (obs_id, index), command in zip(got, robot.commands, strict=True):
        if obs_id != NO_CHUNK:
            assert decode(command) == (obs_id, index)
    assert client.calls == [0, 14, 26, 38, 50]
    assert summary.missed_ticks == 0 and summary.hold_ticks == 3
    assert summary.jitter_max_ms == 0.0


@pytest.mark.parametrize(("threshold", "holds_expected"), [(25, False), (0, True)])
def test_prefetch_keeps_the_robot_moving(threshold: int, holds_expected: bool) -> None:
    executor, _, _, _ = make(chunk=50, threshold=threshold, latency_ticks=10)
    executor.run(300)
    records = executor.records()
    first = int(np.argmax(records["adopted"]))
    holds = int((records["action_index"][first:] == NO_CHUNK).sum())
    if holds_expected:
        assert holds >= 9 * 4  # query-when-empty: the robot waits out every inference
    else:
        assert holds == 0
        adopted = records[records["adopted"]]
        assert adopted["action_index"][0] == 0  # the first chunk: the arm held since its capture, nothing elapsed
        np.testing.assert_array_equal(adopted["action_index"][1:], 9)  # 10 ticks of latency moving on the old one
    assert executor.counters.missed_ticks == 0


def test_replies_whose_actions_all_elapsed_are_dropped() -> None:
    # The arm follows a 30-action chunk (obs 0, ticks 8 to 37) while 5-action replies come 8 ticks after their
    # capture: the arm moved on through all their actions meanwhile (obs 8, 16, 24; obs 32's 5 moving ticks, 33 to
    # 37, then 2 held), so they are dropped. Obs 40 was captured while the arm held: none of its actions elapsed.
    executor, _, client, _ = make(chunk=30, threshold=29, latency_ticks=8)
    executor.run(8)
    client.chunk = 5
    executor.run(41)
    counters = executor.counters
    assert client.calls == [0, 8, 16, 24, 32, 40, 48]  # 48: at once from obs 40's chunk
    assert counters.dropped_elapsed == 4 and counters.chunks_adopted == 2
    last = executor.records()[-1]
    assert (last["tick"], last["chunk_obs_id"], last["action_index"]) == (48, 40, 0)


@pytest.mark.parametrize("latency", [3, 12, 25])
def test_a_chunk_after_a_hold_starts_at_the_pose_it_was_planned_from(latency: int) -> None:
    # The policy plans the waist 0.01 rad per action from the pose it observed. The arm held while the first chunk was
    # computed: it starts at action 0, not `latency` actions ahead (a catch-up the policy never asked for, which the
    # slew limit would rate-limit, and `stop_after_rate_limited_ticks` count against the policy).
    executor, robot, client, _ = make(chunk=50, threshold=25, latency_ticks=latency, blend=BlendConfig())

    def ramp(actions: np.ndarray) -> np.ndarray:
        out = actions.copy()
        out[:, 0], out[:, 3] = robot.qpos[0] + 0.01 * (np.arange(len(out)) + 1), 0.0
        return out

    client.transform = ramp
    executor.run(latency + 12)
    records = executor.records()
    assert records["action_index"][records["adopted"]].tolist() == [0]
    # The fade from rest moves as the chunk does and closes the 0.01 rad gap to its first action in window + 1 equal
    # steps: never faster than the chunk plus 1 / (window + 1) of the gap (a plain average of the pose at rest and the
    # chunk would reach (2 window + 1) / (window + 1) of its speed).
    window = BlendConfig().window_ticks
    assert waist_steps(robot).max() == pytest.approx(0.01 + 0.01 / (window + 1), rel=1e-4)
    assert not any(Intervention.RATE_LIMITED.value & flags for flags in records["flags"])


def test_deadlines_skipped_while_the_arm_held_count_as_held() -> None:
    executor, robot, _, clock = make(chunk=20, threshold=8, latency_ticks=3)

    def stall(n: int) -> None:
        if n == 2:  # tick 1's command returns at 4.5 periods: ticks 2 and 3 are skipped, the arm holding
            clock.now += 7 * PERIOD_NS // 2

    robot.on_command = stall
    executor.run(6)
    records = executor.records()
    assert records["tick"].tolist() == [0, 1, 4, 5] and executor.counters.missed_ticks == 2
    assert (records["adopted"][2], records["chunk_obs_id"][2], records["action_index"][2]) == (True, 0, 0)


@pytest.mark.parametrize("skipped", [0, 2, 3])
def test_deadlines_skipped_after_a_chunk_ran_out_count_as_held(skipped: int) -> None:
    # The chunk's last action is at tick 31; obs 23's reply comes at tick 35. The arm held from tick 32 on, whether
    # those ticks ran or were skipped: the new chunk starts at the same action either way.
    executor, robot, _, clock = make(chunk=20, threshold=8, latency_ticks=12)

    def stall(n: int) -> None:
        if skipped and n == 32:  # tick 31's command returns late
            clock.now += (skipped + 1) * PERIOD_NS + PERIOD_NS // 2

    robot.on_command = stall
    executor.run(40)
    records = executor.records()
    adopted = records[records["adopted"]][-1]
    assert executor.counters.missed_ticks == skipped
    assert (adopted["tick"], adopted["chunk_obs_id"], adopted["action_index"]) == (35, 23, 8)


def test_older_and_duplicate_replies_are_dropped() -> None:
    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3, source_cls=ReplaySource)
    executor.run(60)
    assert executed(executor) == expected_schedule(60, chunk=20, threshold=8, latency=3)
    counters = executor.counters
    assert counters.chunks_adopted == 5
    assert counters.dropped_older == 4


def test_holds_while_the_server_is_down_and_recovers() -> None:
    executor, robot, client, _ = make(chunk=20, threshold=8, latency_ticks=3)
    executor.run(30)
    client.down = True  # server restart: requests time out after 10 ticks
    executor.run(60)
    outage = executor.records()[30:]
    assert executor.counters.request_failures >= 4
    held = outage["action_index"] == NO_CHUNK
    assert held[-40:].all()
    last_sent = robot.commands[-1]
    np.testing.assert_array_equal(np.array(robot.commands[-40:]), np.tile(last_sent, (40, 1)))
    assert all(Intervention.HELD.value & f for f in outage["flags"][-40:])

    client.down = False
    executor.run(60)
    recovered = executor.records()[90:]
    assert recovered["adopted"].any()
    assert (recovered["action_index"][-30:] != NO_CHUNK).all()
    assert executor.counters.missed_ticks == 0


def test_stop_latches_hold_and_resume_waits_for_a_fresh_chunk() -> None:
    executor, robot, _, _ = make(chunk=20, threshold=8, latency_ticks=3)
    executor.run(15)  # obs 14 is in flight
    executor.stop("operator pressed stop")
    summary = executor.run(20)
    stopped = executor.records()[15:]
    assert all(Intervention.STOPPED.value & f for f in stopped["flags"])
    assert summary.hold_ticks == 20  # held although the chunk in hand has actions for them
    assert (stopped["chunk_obs_id"] == NO_CHUNK).all() and (stopped["action_index"] == NO_CHUNK).all()
    assert not stopped["requested"].any()
    np.testing.assert_array_equal(np.array(robot.commands[15:]), np.tile(robot.commands[14], (20, 1)))
    assert executor.counters.dropped_stopped == 1

    executor.resume()
    executor.run(20)
    resumed = executor.records()[35:]
    assert resumed["requested"][0]
    assert (resumed["action_index"][:3] == NO_CHUNK).all()  # the pre-stop chunk is gone
    adopted = resumed[resumed["adopted"]]
    assert adopted["chunk_obs_id"][0] == resumed["tick"][0]


def test_every_command_goes_through_the_safety_filter() -> None:
    executor, robot, client, _ = make(chunk=20, threshold=8, latency_ticks=1)

    def corrupt(actions: np.ndarray) -> np.ndarray:
        actions[3, 5] = np.nan
        actions[4, 6] = 3.0  # gripper past open
        actions[5, 1] = -0.96 + 0.5  # shoulder jump
        return actions

    client.transform = corrupt
    executor.run(8)
    by_index = {int(r["action_index"]): Intervention(int(r["flags"])) for r in executor.records()}
    assert by_index[NO_CHUNK] == Intervention.HELD
    assert by_index[3] == Intervention.NON_FINITE | Intervention.HELD
    assert by_index[4] == Intervention.CLAMPED
    assert by_index[5] == Intervention.RATE_LIMITED
    assert robot.commands[-3][6] == 1.0


@pytest.mark.parametrize(
    "malform", [lambda a: a[:, :7], lambda a: a[0, 0], lambda a: a[:0]], ids=["7 joints", "a scalar", "no actions"]
)
def test_malformed_chunk_is_dropped(malform: Callable[[np.ndarray], np.ndarray]) -> None:
    executor, _, client, _ = make(latency_ticks=1)
    client.transform = malform
    summary = executor.run(10)
    assert executor.counters.dropped_malformed >= 4
    assert summary.hold_ticks == 10


class TwelveDimRobot(FakeRobot):
    """Reports and takes 12 joint values (5-joint arms) while its observation carries 14, as a miswired rig would."""

    def current_qpos(self) -> np.ndarray:
        return self.qpos[:12].copy()

    def command(self, qpos_target: np.ndarray) -> None:
        self.commands.append(qpos_target.copy())


def test_chunks_wider_than_the_safety_dims_are_warned_about_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    safety = SafetyFilter(SafetyConfig(joint_lower=VX300S_JOINT_LOWER[:5], joint_upper=VX300S_JOINT_UPPER[:5]))
    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=8)
    source = LatencySource(FakeClient(20), clock, latency_ticks=3)
    executor = ChunkExecutor(TwelveDimRobot(clock), source, safety, config, clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        summary = executor.run(250)  # 10 s; a 14-wide chunk is dropped every 3 ticks from tick 3
    assert summary.hold_ticks == 250 and executor.counters.dropped_malformed == 83
    warnings = [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()]
    assert len(warnings) == 2  # the first drop at once, then one 5 s later
    assert "obs 0: its actions have shape (20, 14), expected (N, 12)" in warnings[0]
    assert "1 malformed chunks dropped since the last such warning" in warnings[0]
    assert "42 malformed chunks dropped since the last such warning" in warnings[1]  # ticks 6, 9, ... 129


def test_late_tick_skips_missed_deadlines_and_stays_time_aligned() -> None:
    executor, robot, _, clock = make(chunk=20, threshold=8, latency_ticks=3)

    def stall(n: int) -> None:
        if n == 6:  # the command of tick 5 returns at 7.5 periods: deadline 6 is lost, tick 7 runs late
            clock.now += 5 * PERIOD_NS // 2

    robot.on_command = stall
    summary = executor.run(20)
    records = executor.records()
    assert summary.missed_ticks == executor.counters.missed_ticks == 1
    assert len(records) == 19
    assert records["tick"][5:7].tolist() == [5, 7]
    assert records["missed"][6] == 1
    assert records["action_index"][5:7].tolist() == [2, 4]  # tick 6 is skipped together with its action
    assert records["wake_ns"][6] - records["deadline_ns"][6] == PERIOD_NS // 2


@pytest.mark.parametrize("blend", [HARD_SWITCH, BlendConfig(), BlendConfig(BlendScheme.ENSEMBLE)])
def test_skipped_ticks_fade_into_the_chunk_rather_than_jump(blend: BlendConfig) -> None:
    executor, robot, _, clock = make(chunk=50, threshold=8, latency_ticks=3, blend=blend)

    def stall(n: int) -> None:
        if n == 20:  # tick 19's command returns 5.5 periods late: the chunk's index jumps with the skipped ticks
            clock.now += 11 * PERIOD_NS // 2

    robot.on_command = stall
    executor.run(40)
    skipped = executor.counters.missed_ticks
    assert skipped == 4 and executor.counters.chunks_adopted == 1
    # The forearm roll moves 1 mrad per action; from the 20th command (tick 19) on: the skip, then the fade.
    steps = np.abs(np.diff(np.array(robot.commands)[:, 3]))[19:]
    window = blend.window_ticks if blend.scheme is not BlendScheme.NONE else 0
    # Hard: the skipped motion at once; blended: the chunk's own step plus 1/(window + 1) of the skipped motion, on
    # each tick of the fade.
    expected = [(skipped + 1) * 1e-3] if not window else [1e-3 + skipped * 1e-3 / (window + 1)] * window
    assert steps[: len(expected)] == pytest.approx(expected, rel=1e-3)
    assert steps.max() == pytest.approx(max(expected), rel=1e-3)
    assert steps[-5:] == pytest.approx(1e-3, rel=1e-3)  # on the chunk again after the fade
    records = executor.records()
    assert robot.commands[-1][3] == pytest.approx(records["action_index"][-1] * 1e-3, abs=1e-7)


def test_a_run_the_robot_ends_counts_only_the_ticks_it_commanded() -> None:
    executor, robot, _, _ = make(latency_ticks=100)  # no chunk comes: every tick holds

    def fail(n: int) -> None:
        if n == 31:
            raise ConnectionError("the arm's bus is gone")

    robot.on_command = fail
    with pytest.raises(ConnectionError):
        executor.run(40)
    counters = executor.counters
    assert counters.ticks == 30 and counters.hold_ticks == 30  # not 31 held of 30 ticks


class BlindRobot(FakeRobot):
    """Reads a non-finite joint angle after its commands number `blind` (a failed encoder read): the safety filter
    holds the last pose on those ticks."""

    def __init__(self, clock: Callable[[], int], *, blind: range) -> None:
        super().__init__(clock)
        self.blind = blind

    def current_qpos(self) -> np.ndarray:
        qpos = super().current_qpos()
        if len(self.commands) in self.blind:
            qpos[0] = np.nan
        return qpos


class ProprioLostRobot(FakeRobot):
    """Reports a non-finite joint angle in its observations after its commands number 23 to 28 (ticks 22 to 27)."""

    def observe(self) -> Observation:
        observation = super().observe()
        if len(self.commands) in range(23, 29):
            observation.proprio[0] = np.nan
        return observation


def test_no_request_carries_an_observation_whose_proprio_is_not_finite() -> None:
    executor, _, client, _ = make(chunk=20, threshold=8, latency_ticks=3, robot_cls=ProprioLostRobot)
    executor.run(40)
    assert 28 in client.calls and not set(client.calls) & set(range(22, 28))  # asked again once it reads one
    assert executor.counters.request_failures == 0 and executor.counters.chunks_adopted >= 2


@pytest.mark.parametrize("blend", [BlendConfig(), BlendConfig(BlendScheme.ENSEMBLE)])
def test_after_ticks_the_safety_filter_held_the_command_fades_back_into_the_chunk(blend: BlendConfig) -> None:
    blind = functools.partial(BlindRobot, blind=range(20, 25))  # ticks 20..24 read NaN: tick 19's pose is held
    executor, robot, _, _ = make(chunk=50, threshold=8, latency_ticks=3, robot_cls=blind, blend=blend)
    executor.run(45)
    assert executor.counters.chunks_adopted == 1
    roll = np.array(robot.commands)[:, 3]
    assert np.all(roll[20:25] == roll[19])  # held
    steps = np.abs(np.diff(roll))[24:]
    window, held = blend.window_ticks, 5
    # As after skipped ticks: the chunk's own step plus 1/(window + 1) of the held motion, not a catch-up at the
    # slew limit (which `stop_after_rate_limited_ticks` would take for the policy's fault).
    assert steps[:window] == pytest.approx([1e-3 + held * 1e-3 / (window + 1)] * window, rel=1e-3)
    assert steps[-5:] == pytest.approx(1e-3, rel=1e-3)  # on the chunk again
    assert executor.records()["flags"][25:].tolist() == [0] * 20  # nothing rate limited after the hold


@pytest.mark.parametrize(
    ("stall_at", "blind"), [(15, range(0)), (None, range(15, 17)), (None, range(13, 17)), (None, range(11, 17))]
)
def test_actions_never_commanded_at_a_chunks_end_do_not_place_the_next_chunk_ahead(
    stall_at: int | None, blind: range
) -> None:
    # A policy that plans 1 mrad per action from the pose it observed. The chunk's last actions are skipped (tick 14's
    # command returns 3.5 periods late) or held by the safety filter (non-finite readings) and it runs out: the arm
    # held there, so the next chunk must start from that pose: no step of more than 1 mrad (plus 1 per deadline
    # skipped right before it, inside a chunk: a hard switch jumps over the skipped actions). Held ticks up to the
    # capture (tick 14) are in its observation: the chunk acts from the tick it is adopted on.
    robot_cls = functools.partial(BlindRobot, blind=blind)
    executor, robot, client, clock = make(chunk=10, threshold=2, latency_ticks=7, robot_cls=robot_cls)

    def ramp(actions: np.ndarray) -> np.ndarray:
        out = np.tile(robot.qpos, (len(actions), 1))
        out[:, 3] += 1e-3 * (np.arange(len(out)) + 1)
        return out

    def stall(n: int) -> None:
        if n == stall_at:
            clock.now += 7 * PERIOD_NS // 2

    client.transform, robot.on_command = ramp, stall
    executor.run(30)
    assert (executor.counters.missed_ticks > 0) == (stall_at is not None) and executor.counters.chunks_adopted >= 2
    steps = np.diff(np.array(robot.commands)[:, 3])
    records = executor.records()
    assert np.all(steps <= 1e-3 * (1 + records["missed"][1:]) + 1e-9) and steps.max() > 0
    assert np.all(records["action_index"][records["adopted"]] != NO_CHUNK)


@pytest.mark.parametrize("scheme", [BlendScheme.CROSSFADE, BlendScheme.ENSEMBLE])
def test_a_chunk_adopted_on_a_tick_after_skipped_ones_fades_in_too(scheme: BlendScheme) -> None:
    executor, robot, client, clock = make(chunk=50, threshold=25, latency_ticks=3, blend=BlendConfig(scheme))

    def on_the_clock(actions: np.ndarray) -> np.ndarray:  # every chunk on one trajectory: 1 mrad of roll per tick
        timed = actions.copy()
        obs_id = round(float(actions[0, 0]) * 1e3)
        # Action 0 is commanded at tick 3 for the first chunk (captured at 0, 2 ticks held since), the tick after
        # their capture for the others (the arm moved on meanwhile): roll(tick) = tick mrad.
        start = 3 if obs_id == 0 else obs_id + 1
        timed[:, 0], timed[:, 3] = 0.0, (start + np.arange(len(actions))) * 1e-3
        return timed

    client.transform = on_the_clock

    def stall(n: int) -> None:
        if n == 29:  # tick 28's command returns 5.5 periods late; the next chunk is there when ticks resume
            clock.now += 11 * PERIOD_NS // 2

    robot.on_command = stall
    executor.run(60)
    records = executor.records()
    skipped = executor.counters.missed_ticks
    resumed = int(np.flatnonzero(records["missed"])[0])
    assert skipped == 4 and records["adopted"][resumed]  # a new chunk on the first tick after the skip
    steps = np.abs(np.diff(np.array(robot.commands)[:, 3]))[resumed - 1 :]
    window = BlendConfig().window_ticks
    assert steps.max() == pytest.approx(1e-3 + skipped * 1e-3 / (window + 1), rel=1e-3)  # not 38 % of it at once


def test_record_ring_is_bounded_and_ordered() -> None:
    executor, _, _, _ = make(record_capacity=16)
    executor.run(40)
    records = executor.records()
    assert records["tick"].tolist() == list(range(24, 40))
    assert executor.counters.ticks == 40


def test_run_by_duration_and_argument_checks() -> None:
    executor, _, _, _ = make()
    assert executor.run(duration_s=0.4).ticks == 10
    with pytest.raises(ConfigError, match="num_ticks or duration_s"):
        executor.run()
    with pytest.raises(ConfigError, match="num_ticks or duration_s"):
        executor.run(3, duration_s=1.0)
    for bad in (-5, 2.5, True):
        with pytest.raises(ConfigError, match=r"executor\.run\.num_ticks"):
            executor.run(bad)  # type: ignore[arg-type]
    for bad_s in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"executor\.run\.duration_s"):
            executor.run(duration_s=bad_s)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"control_rate_hz": 0.0},
        {"control_rate_hz": "25"},
        {"prefetch_threshold": -1},
        {"prefetch_threshold": "25"},
        {"prefetch_threshold": 2.5},
        {"retry_delay_s": -0.1},
        {"retry_delay_s": float("nan")},
        {"retry_delay_s": float("inf")},
        {"retry_delay_s": 1e300},
        {"record_capacity": 0},
        {"record_capacity": 2.5},
        {"realtime_priority": 0},
        {"realtime_priority": 10.5},
        {"nice": 20},
        {"nice": -5.5},
        {"adaptive_prefetch": "yes"},
        {"latency_margin": float("inf")},
        {"starvation_warning_s": float("nan")},
        {"blend": "crossfade"},
    ],
)
def test_invalid_executor_config_names_the_field(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(ConfigError, match=f"^executor\\.{name}: expected"):
        ExecutorConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "fade"},
        {"window_ticks": 0},
        {"window_ticks": 2.5},
        {"window_ticks": "8"},
        {"window_ticks": True},
        {"ensemble_decay": float("inf")},
        {"ensemble_decay": "0.5"},
        {"lowpass_alpha": 0.0},
        {"lowpass_alpha": float("nan")},
        {"lowpass_alpha": "0.5"},
    ],
)
def test_invalid_blend_config_names_the_field(kwargs: dict) -> None:
    (name,) = kwargs
    with pytest.raises(ConfigError, match=f"^blend\\.{name}: expected"):
        BlendConfig(**kwargs)


def test_a_huge_latency_margin_caps_the_prefetch_point_at_the_chunk() -> None:
    margin = sys.float_info.max  # times the round trip in ns: infinite
    executor, _, _, _ = make(chunk=20, threshold=2, latency_ticks=3, adaptive_prefetch=True, latency_margin=margin)
    executor.run(20)
    assert executor.prefetch_threshold == 19


def test_resume_without_a_stop_keeps_the_chunk_in_hand() -> None:
    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3)
    executor.run(10)  # chunk 0 runs from tick 1
    executor.resume()
    executor.run(5)
    resumed = executor.records()[10:]
    assert (resumed["chunk_obs_id"] == 0).all() and (resumed["action_index"] != NO_CHUNK).all()


def test_a_stop_after_a_resume_still_pending_wins() -> None:
    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3)
    executor.run(13)
    executor.stop("operator pressed stop")
    executor.run(2)
    executor.resume()
    executor.stop("collision detected")  # before any tick applied the resume
    executor.run(5)
    held = executor.records()[15:]
    assert all(Intervention.STOPPED.value & f for f in held["flags"]) and not held["requested"].any()


def test_every_resume_after_a_stop_is_applied_whoever_latched_it() -> None:
    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3)
    safety = executor._safety  # the filter's own latch, which any thread may set
    for stopped_by in (lambda: safety.stop("filter"), lambda: executor.stop("operator"), lambda: safety.stop("again")):
        executor.run(5)
        stopped_by()
        executor.run(3)
        assert executor.records()["flags"][-1] & Intervention.STOPPED.value
        executor.resume()
        executor.run(3)
        assert not safety.stopped and not executor.records()["flags"][-1] & Intervention.STOPPED.value


def test_requests_that_keep_failing_are_warned_about_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, client, _ = make(latency_ticks=1)
    client.down = True
    with caplog.at_level(logging.DEBUG, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(120)  # 4.8 s of fake time: a retry after every failure, one warning per 5 s
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "failed" in r.getMessage()]
    failures = executor.counters.request_failures
    assert failures > 5 and len(warnings) == 1
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "request for obs" in r.getMessage()]
    assert len(debug) == failures - 1


def test_priority_applies_to_the_control_thread_during_run_only(caplog: pytest.LogCaptureFixture) -> None:
    executor, robot, _, _ = make(realtime_priority=10, nice=5)
    seen: list[tuple[int, int]] = []
    robot.on_command = lambda n: seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))
    after: list[tuple[int, int]] = []

    def control_thread() -> None:  # a thread of its own: a niceness that cannot be lowered back stays with it
        executor.run(3)
        after.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))

    before = (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0))
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.ticks"):
        thread = threading.Thread(target=control_thread)
        thread.start()
        thread.join()
    fifo, lowering = _in_a_thread(_may_use_fifo), _in_a_thread(_may_lower_niceness)  # what this process may do
    assert ("SCHED_FIFO 10 refused" in caplog.text) is not fifo
    if fifo:
        assert seen == [(os.SCHED_FIFO, before[1])] * 3
    else:
        assert seen == [(before[0], 5)] * 3  # fell back to nice
    if fifo or lowering:
        assert after == [before] and "could not restore" not in caplog.text
    else:  # unprivileged, a raised niceness stays, and is warned about
        assert "could not restore" in caplog.text


def _in_a_thread(probe: Callable[[], bool]) -> bool:
    """`probe` on a thread of its own, whose scheduling it may change for good."""
    result: list[bool] = []
    thread = threading.Thread(target=lambda: result.append(probe()))
    thread.start()
    thread.join()
    return result[0]


def _may_use_fifo() -> bool:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        return False
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    return True


def _may_lower_niceness() -> bool:
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, niceness + 1)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        return False
    return True


class SpinClock:
    """`time` for `precise_sleep`: each reading of the clock moves it on by 10 µs (a spin), a sleep by its length."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, list[float]()

    def perf_counter(self) -> float:
        self.now += 1e-5
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("seconds", [0.0005, 0.005])
def test_precise_sleep_sleeps_short_of_the_deadline_then_spins_to_it(
    seconds: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SpinClock()
    monkeypatch.setattr(ticks, "time", clock)
    start = clock.now
    precise_sleep(seconds)
    # Asleep until the spin margin before the deadline (not at all for a shorter wait), awake at the deadline; how
    # late a real wake-up comes is measured in benchmarks/.
    assert clock.slept == ([seconds - ticks.SPIN_MARGIN_S] if seconds > ticks.SPIN_MARGIN_S else [])
    assert start + seconds <= clock.now <= start + seconds + 2e-5


# Threaded source and real clock.


def request(obs_id: int) -> ChunkRequest:
    observation = Observation(images={}, proprio=START.astype(np.float32))
    now, wall = time.monotonic_ns(), time.time_ns()
    return ChunkRequest(obs_id, first_tick=obs_id + 1, capture_ns=now, capture_wall_ns=wall, observation=observation)


def wait_outcome(source: ThreadedChunkSource, timeout_s: float = 2.0) -> Outcome:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        outcome = source.poll()
        if outcome is not None:
            return outcome
        time.sleep(0.001)
    raise AssertionError("no outcome")


def test_threaded_source_answers_and_maps_failures() -> None:
    client = FakeClient(chunk=4, latency_s=0.02)
    with ThreadedChunkSource(client, PARAMS) as source:
        sent = request(7)
        source.submit(sent)
        assert source.busy
        with pytest.raises(RuntimeError, match="busy"):
            source.submit(request(8))
        chunk = wait_outcome(source)
        assert isinstance(chunk, Chunk)
        assert (chunk.obs_id, chunk.first_tick, chunk.actions.shape, chunk.actions.dtype) == (7, 8, (4, 14), np.float32)
        assert chunk.capture_ns == sent.capture_ns and not source.busy
        assert client.capture_times == [sent.capture_wall_ns]  # the wire carries the wall clock

        client.down = True
        source.submit(request(9))
        failed = wait_outcome(source)
        assert isinstance(failed, RequestFailed) and isinstance(failed.error, FakeTimeout) and failed.obs_id == 9

        client.down = False
        client.act = lambda *a, **k: Reply(obs_id=1, actions=encode(1, 4))  # type: ignore[method-assign]
        source.submit(request(10))
        mismatch = wait_outcome(source)
        assert isinstance(mismatch, RequestFailed) and isinstance(mismatch.error, ValueError)
        assert "expected 10, got 1" in str(mismatch.error)

        def boom(*args: object, **kwargs: object) -> Reply:
            raise ConnectionError("remote error")

        client.act = boom  # type: ignore[method-assign]
        source.submit(request(11))
        remote = wait_outcome(source)
        assert isinstance(remote, RequestFailed) and isinstance(remote.error, ConnectionError)

        client.act = lambda *a, **k: Reply(obs_id=12, actions=encode(12, 4), value=None)  # type: ignore
        source.submit(request(12))
        unreadable = wait_outcome(source)  # the worker survives a reply it cannot read
        assert isinstance(unreadable, RequestFailed) and isinstance(unreadable.error, TypeError)
        assert not source.busy


def test_threaded_source_prepares_observations_on_its_worker() -> None:
    client = FakeClient(chunk=4)
    prepared_on: list[str] = []

    def prepare(observation: Observation) -> Observation:
        prepared_on.append(threading.current_thread().name)
        if not observation.images:
            raise ValueError("no camera frames")
        return observation

    with ThreadedChunkSource(client, PARAMS, prepare=prepare) as source:
        source.submit(request(7))  # no frames: `prepare` fails, as a bad camera frame would
        failed = wait_outcome(source)
        assert isinstance(failed, RequestFailed) and isinstance(failed.error, ValueError) and client.calls == []
        framed = dataclasses.replace(request(8), observation=Observation({"cam_high": np.zeros((2, 2, 3))}, START))
        source.submit(framed)
        assert isinstance(wait_outcome(source), Chunk) and client.calls == [8]
    assert prepared_on == ["chunk-source", "chunk-source"]  # not the control loop's thread


def test_a_source_stopped_while_it_prepares_sends_nothing() -> None:
    client, preparing, release = FakeClient(chunk=4), threading.Event(), threading.Event()

    def slow_prepare(observation: Observation) -> Observation:
        preparing.set()
        assert release.wait(5)
        return observation

    with ThreadedChunkSource(client, PARAMS, prepare=slow_prepare) as source:
        source.submit(request(7))
        assert preparing.wait(5)
        source.stop_requests()  # as the run ends, before its client is closed
        release.set()
    assert client.calls == []  # the request prepared meanwhile was not sent


def test_threaded_source_stays_busy_until_its_outcome_is_polled() -> None:
    client = FakeClient(chunk=4)
    with ThreadedChunkSource(client, PARAMS) as source:
        source.submit(request(7))
        deadline = time.monotonic() + 2.0
        while source._outcome is None:  # the worker has stored the outcome (the only sign short of polling it)
            assert time.monotonic() < deadline, "no outcome"
            time.sleep(0.001)
        assert source.busy  # finished but not taken: a second request now would answer the same situation twice
        assert isinstance(source.poll(), Chunk) and not source.busy


def test_a_source_whose_requests_were_stopped_fails_them_and_the_loop_holds_on() -> None:
    # A rig's shutdown path may stop the source from another thread while the control loop still runs.
    source = ThreadedChunkSource(FakeClient(chunk=4), PARAMS)
    source.submit(request(6))  # handed over, not yet taken by the worker when requests stop: it fails too
    source.stop_requests()
    source.start()
    pending = wait_outcome(source)
    assert isinstance(pending, RequestFailed) and pending.obs_id == 6 and not source.busy
    source.submit(request(7))
    failed = source.poll()
    assert isinstance(failed, RequestFailed) and "requests were stopped" in str(failed.error) and not source.busy
    clock, robot = FakeClock(), FakeRobot()
    config = ExecutorConfig(control_rate_hz=RATE_HZ)
    executor = ChunkExecutor(robot, source, SafetyFilter(SafetyConfig()), config, clock=clock, sleep=clock.sleep)
    summary = executor.run(20)
    assert summary.hold_ticks == 20 and executor.counters.request_failures >= 1
    source.close()


def test_threaded_source_close_stops_the_worker() -> None:
    source = ThreadedChunkSource(FakeClient(chunk=4), PARAMS)
    source.start()
    source.close()
    assert not any(t.name == "chunk-source" and t.is_alive() for t in threading.enumerate())


# --- Chunk boundaries: blending, boundary statistics, starvation ---

WIDE_STEP = SafetyConfig(max_joint_step=0.5)  # the most allowed: the tests see what the executor asks for, unclamped


def offset_chunks(client: FakeClient, offsets: list[float], noise: float = 0.0) -> None:
    """The k-th reply's waist joint (index 0) is a slow ramp plus `offsets[k % len]`, with optional noise."""
    replies = iter(range(1_000_000))
    rng = np.random.default_rng(0)

    def transform(actions: np.ndarray) -> np.ndarray:
        k = next(replies)
        out = actions.copy()
        out[:, 0] = offsets[k % len(offsets)] + 0.002 * np.arange(len(out)) + noise * rng.standard_normal(len(out))
        return out

    client.transform = transform


def make_blending(blend: BlendConfig, safety: SafetyConfig = WIDE_STEP) -> tuple[ChunkExecutor, FakeRobot, FakeClient]:
    clock = FakeClock()
    robot, client = FakeRobot(clock), FakeClient(chunk=20)
    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=8, adaptive_prefetch=False, blend=blend)
    executor = ChunkExecutor(
        robot, LatencySource(client, clock, 3), SafetyFilter(safety), config, clock=clock, sleep=clock.sleep
    )
    return executor, robot, client


def waist_steps(robot: FakeRobot) -> np.ndarray:
    return np.abs(np.diff(np.array(robot.commands)[:, 0]))


def test_boundary_statistics_keep_the_grippers_apart_from_the_arm_joints() -> None:
    # Grippers move a normalised opening, not radians: a gripper's jump must not read as an arm joint's.
    executor, _, client = make_blending(BlendConfig(BlendScheme.NONE))
    replies = iter(range(1_000_000))
    grippers = list(SafetyConfig().gripper_indices)

    def transform(actions: np.ndarray) -> np.ndarray:
        out = actions.copy()
        out[:, 0] = 0.1 * (next(replies) % 2)  # the waist alternates 0 and 0.1 rad between chunks
        out[:, grippers] = 0.5 * (out[:, :1] > 0)  # each gripper alternates 0 and 0.5 (half open)
        return out

    client.transform = transform
    executor.run(60)
    later = executor.boundaries()[1:]
    assert later and all(b.raw_jump == pytest.approx(0.1) and b.gripper_raw_jump == 0.5 for b in later)
    summary = summarize_boundaries(later)
    assert summary.raw_jump_max == pytest.approx(0.1) and summary.gripper_commanded_jump_max == 0.5


@pytest.mark.parametrize("window", [4, 8])
def test_crossfade_bounds_the_boundary_step_and_then_follows_the_new_chunk(window: int) -> None:
    executor, robot, client = make_blending(BlendConfig(BlendScheme.CROSSFADE, window_ticks=window))
    offset_chunks(client, [0.0, 0.3, -0.3])
    executor.run(120)
    boundaries = executor.boundaries()
    assert len(boundaries) >= 5
    later = boundaries[1:]  # the first chunk fades in from the hold pose (raw jump 0 there: same waist angle)
    for boundary in later:
        assert boundary.raw_jump > 0.25  # what a hard switch would command in one tick (0.3 less the ramp)
        # Each tick of the fade closes 1/(window+1) of the gap, which moves by at most 2 mrad per tick (the old
        # chunk may run out and be held during the fade), on top of the trajectory's own 2 mrad step.
        assert boundary.commanded_jump <= boundary.raw_jump / (window + 1) + 0.0041
    # Outside the fade windows the robot executes each new chunk exactly.
    records = executor.records()
    commands = np.array(robot.commands)
    adopted = np.flatnonzero(records["adopted"])
    for start, end in itertools.pairwise(adopted[1:]):
        for tick in range(start + window, end):
            index = records["action_index"][tick]
            obs_id = records["chunk_obs_id"][tick]
            assert decode(commands[tick])[1] == index and obs_id != NO_CHUNK


def test_hard_switch_jumps_and_the_safety_filter_clamps_it() -> None:
    executor, robot, client = make_blending(HARD_SWITCH, SafetyConfig())  # the default 0.15 rad per tick
    offset_chunks(client, [0.0, 0.3, -0.3])
    executor.run(120)
    later = executor.boundaries()[1:]
    assert all(b.commanded_jump >= 0.149 and b.safety_ticks >= 1 for b in later)
    blended, blended_robot, blended_client = make_blending(BlendConfig(), SafetyConfig())
    offset_chunks(blended_client, [0.0, 0.3, -0.3])
    blended.run(120)
    assert all(b.safety_ticks == 0 and b.commanded_jump < 0.1 for b in blended.boundaries()[1:])
    assert waist_steps(blended_robot).max() < waist_steps(robot).max() / 2


def test_noisy_chunks_stay_continuous_with_blending() -> None:
    executor, _, client = make_blending(BlendConfig(BlendScheme.CROSSFADE, window_ticks=8))
    offset_chunks(client, [0.0, 0.05, -0.05], noise=0.01)
    executor.run(150)
    boundaries = executor.boundaries()[1:]
    assert boundaries and all(b.commanded_jump < b.raw_jump for b in boundaries if b.raw_jump > 0.05)


def test_ensemble_weighs_the_older_chunk_until_it_runs_out() -> None:
    decay, window = 0.5, 4  # the old chunk has 5 ticks left at the switch, more than the window
    executor, robot, client = make_blending(BlendConfig(BlendScheme.ENSEMBLE, window, ensemble_decay=decay))
    offset_chunks(client, [0.0, 0.3])
    executor.run(40)
    records = executor.records()
    second = np.flatnonzero(records["adopted"])[1]
    old, new = records["chunk_obs_id"][second - 1], records["chunk_obs_id"][second]
    assert old != new
    weight = np.exp(-decay)
    # At the switch the old chunk's waist (ramp + 0) and the new one's (ramp + 0.3) mix with weights r : e^-m, where
    # r ramps from 1 down to 0 over the old chunk's last `window` ticks.
    old_index = records["action_index"][second - 1] + 1  # the old chunk's action index at this tick
    ramp = min(1.0, (20 - old_index) / (window + 1))
    old_waist = 0.002 * old_index
    new_waist = 0.3 + 0.002 * records["action_index"][second]
    expected = (ramp * old_waist + weight * new_waist) / (ramp + weight)
    assert robot.commands[second][0] == pytest.approx(expected, abs=1e-6)
    # Once the old chunk has run out, the new one is followed alone.
    last = second + (20 - old_index)
    index = records["action_index"][last]
    assert decode(robot.commands[last])[1] == index and robot.commands[last][0] == pytest.approx(0.3 + 0.002 * index)


def test_lowpass_smooths_the_target() -> None:
    executor, robot, client = make_blending(BlendConfig(BlendScheme.NONE, lowpass_alpha=0.5))
    offset_chunks(client, [0.0, 0.3])
    executor.run(40)
    second = np.flatnonzero(executor.records()["adopted"])[1]
    commands = np.array(robot.commands)[:, 0]
    assert 0.1 < commands[second] - commands[second - 1] < 0.2  # half of the 0.3 jump, plus the ramp


def blend_run(blender: ChunkBlender, adopted: dict[int, np.ndarray], ticks: int) -> np.ndarray:
    """Commands of `ticks` ticks from a blender alone: chunk `adopted[t]` (starting at tick t) is adopted at tick t;
    the pose before the first chunk is 0, and a tick past the chunk in hand holds (no action)."""
    commands = [np.zeros(1)]
    chunk, chunk_first = None, 0
    for tick in range(ticks):
        if tick in adopted:
            blender.switch(tick, adopted[tick], tick, chunk, chunk_first, commands[-1])
            chunk, chunk_first = adopted[tick], tick
        assert chunk is not None
        action = chunk[tick - chunk_first] if tick - chunk_first < len(chunk) else None
        held = next(command for command in reversed(commands) if np.isfinite(command).all())  # what the robot got
        target = blender.target(tick, action, held)
        command = commands[-1] if target is None else target  # the safety filter holds the pose
        blender.observe_command(tick, command, safety_intervened=False)
        commands.append(command)
    return np.concatenate(commands)


@pytest.mark.parametrize("scheme", [BlendScheme.CROSSFADE, BlendScheme.ENSEMBLE])
def test_a_chunk_after_the_old_one_ran_out_fades_in_under_both_schemes(scheme: BlendScheme) -> None:
    blender = ChunkBlender(BlendConfig(scheme, window_ticks=8))
    commands = blend_run(blender, {0: np.zeros((10, 1)), 15: np.ones((40, 1))}, 30)  # ticks 10..14 hold
    assert np.abs(np.diff(commands)).max() <= 1 / 9 + 1e-9 and commands[-1] == 1.0


def test_frequent_chunks_of_one_trajectory_are_followed_without_lag() -> None:
    # Chunks every 4 ticks, within the 8-tick fade: each fades from a trajectory that keeps moving, not a frozen pose.
    trajectory = 0.01 * np.arange(80, dtype=np.float64)[:, None]
    adopted = {tick: trajectory[tick : tick + 20] for tick in range(0, 40, 4)}
    commands = blend_run(ChunkBlender(BlendConfig(BlendScheme.CROSSFADE, window_ticks=8)), adopted, 40)
    behind = trajectory[:40, 0] - commands[1:]  # the first chunk fades in from the resting pose 0, then catches up
    assert (np.diff(behind[4:]) <= 1e-12).all() and behind[-1] < 2e-4  # a frozen pose per fade would stay ~0.05 behind


def test_an_ensemble_reaches_the_new_chunk_without_a_jump_when_the_old_one_ends() -> None:
    blender = ChunkBlender(BlendConfig(BlendScheme.ENSEMBLE, window_ticks=8, ensemble_decay=0.5))
    commands = blend_run(blender, {0: np.zeros((20, 1)), 10: np.ones((40, 1))}, 30)
    weight = np.exp(-0.5)
    steps = np.abs(np.diff(commands))  # steps[t]: into tick t's command
    assert steps[10] == pytest.approx(weight / (1 + weight))  # the switch: the ensemble's own weights
    assert steps[11:].max() < 0.2 and commands[-1] == 1.0  # then gradually onto the new chunk as the old one ends
    boundary = blender.boundaries()[-1]  # its statistics span the old chunk's end (tick 20)
    assert boundary.tick == 10 and boundary.commanded_jump == pytest.approx(steps[10:21].max())


@pytest.mark.parametrize("ticks_left", [1, 4, 8])
def test_an_ensemble_fades_in_a_chunk_that_comes_as_the_old_one_ends(ticks_left: int) -> None:
    # The old chunk's weight is ramping down there: weighed against it, the new chunk would take most of the gap.
    blender = ChunkBlender(BlendConfig(BlendScheme.ENSEMBLE, window_ticks=8, ensemble_decay=0.5))
    commands = blend_run(blender, {0: np.zeros((20, 1)), 20 - ticks_left: np.ones((40, 1))}, 40)
    assert np.abs(np.diff(commands)).max() <= 1 / 9 + 1e-9 and commands[-1] == 1.0


def test_the_lowpass_restarts_from_the_commanded_pose_after_a_hold() -> None:
    blender = ChunkBlender(BlendConfig(BlendScheme.NONE, lowpass_alpha=0.5))
    commands = blend_run(blender, {0: np.zeros((5, 1)), 8: np.ones((20, 1))}, 12)  # ticks 5..7 hold at 0
    assert commands[6:9].tolist() == [0.0, 0.0, 0.0]
    assert commands[9] == 0.5  # half way from the held pose, not the raw target


def test_a_chunk_adopted_mid_fade_fades_on_from_what_was_commanded() -> None:
    blender = ChunkBlender(BlendConfig(BlendScheme.CROSSFADE, window_ticks=8))
    zeros, ones = np.zeros((40, 1)), np.ones((40, 1))
    commands = blend_run(blender, {0: zeros, 10: ones, 13: ones.copy()}, 30)  # the third comes 3 ticks into a fade
    assert np.abs(np.diff(commands)).max() <= 1 / 9 + 1e-9  # no jump where it replaced the fade in progress
    assert commands[-1] == pytest.approx(1.0)  # and the newest chunk is reached


def test_non_finite_actions_do_not_spoil_the_blend_or_the_lowpass() -> None:
    poisoned = np.zeros((40, 1))
    poisoned[3] = np.nan
    lowpassed = blend_run(ChunkBlender(BlendConfig(BlendScheme.NONE, lowpass_alpha=0.5)), {0: poisoned}, 10)
    assert np.isnan(lowpassed[4]) and np.isfinite(lowpassed[5:]).all()  # held once (by the safety filter), no more
    ends_badly = np.zeros((12, 1))
    ends_badly[-1] = np.nan
    faded = blend_run(ChunkBlender(BlendConfig(window_ticks=8)), {0: ends_badly, 10: np.ones((40, 1))}, 20)
    assert np.isfinite(faded[11:]).all()  # the old chunk's non-finite last action is not faded from,
    assert np.abs(np.diff(faded[10:])).max() <= 1 / 9 + 1e-9  # the pose commanded at the switch is
    assert BlendConfig(scheme="crossfade").scheme is BlendScheme.CROSSFADE  # type: ignore[arg-type]
    blender = ChunkBlender(BlendConfig(), gripper_dims=(1,))
    new = np.ones((10, 2))
    new[:4, 0] = np.nan  # the switch tick's action is not finite in one dimension: that dimension has no jump
    new[2, 0] = np.inf
    blender.switch(0, np.zeros((10, 2)), 0, None, 0, np.zeros(2))
    blender.switch(5, new, 3, np.zeros((10, 2)), 0, np.zeros(2))
    blender.switch(6, new, 4, np.zeros((10, 2)), 0, np.zeros(2))
    blender.switch(8, np.zeros((10, 2)), 8, new, 3, np.zeros(2))
    boundaries = blender.boundaries()  # the last one still open: listed as collected so far
    assert len(boundaries) == 4 and [(b.raw_jump, b.gripper_raw_jump) for b in boundaries[1:3]] == [(0.0, 1.0)] * 2


@pytest.mark.parametrize("scheme", [BlendScheme.CROSSFADE, BlendScheme.ENSEMBLE])
def test_a_non_finite_old_action_never_pulls_the_command_back(scheme: BlendScheme) -> None:
    ramp = 0.05 * np.arange(60, dtype=np.float64)[:, None]
    old = ramp.copy()
    old[26] = np.nan  # inside the new chunk's blend window
    commands = blend_run(ChunkBlender(BlendConfig(scheme)), {0: old, 20: ramp[20:] + 0.1}, 40)
    assert np.isfinite(commands).all() and (np.diff(commands) >= 0).all()  # the old chunk pauses, never goes back


def test_a_second_run_never_repeats_a_tick_even_on_a_clock_that_has_not_moved() -> None:
    executor, _, _, _ = make()
    executor.run(30)  # ends on the fake clock at exactly the last tick's deadline
    executor.run(30)
    records = executor.records()
    assert (np.diff(records["tick"]) == 1).all() and len(records) == 60
    followed = records["chunk_obs_id"] != NO_CHUNK
    assert (records["action_index"][followed] >= 0).all()  # never a chunk's action before its first tick


def test_a_run_ends_when_asked_to() -> None:
    executor, _, _, _ = make()
    executor.stop("operator")  # the robot holds; the run still ticks until `until` says so
    summary = executor.run(until=lambda: executor.counters.ticks >= 12)
    assert summary.ticks == 12 == executor.counters.ticks
    assert executor.run(5, until=lambda: False).ticks == 5
    for bad in ({}, {"num_ticks": 3, "duration_s": 1.0}):
        with pytest.raises(ConfigError, match=r"executor\.run: give num_ticks or duration_s"):
            executor.run(**bad)  # type: ignore[arg-type]


def test_a_pause_between_runs_is_not_starvation(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, _, clock = make(chunk=20, threshold=8, latency_ticks=3)
    executor.run(15)  # a chunk in hand, the next request (obs 14) in flight
    clock.sleep(10.0)  # both the chunk's actions and the reply's elapse before the next run
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        summary = executor.run(30)
    assert not [r for r in caplog.records if "starved" in r.getMessage()]
    assert executor.counters.starved_ticks == 0
    assert summary.hold_ticks == 3  # the pre-pause reply dropped, a request sent at once: its chunk comes 3 ticks on
    assert executor.counters.dropped_older == 1


def test_a_pause_between_runs_drops_the_chunk_in_hand_and_replies_captured_before_it() -> None:
    # Continued after the pause, the chunk would jump ahead by the ticks paused and answer an older situation.
    executor, _, _, clock = make(chunk=50, threshold=8, latency_ticks=3)
    executor.run(10)  # a chunk (obs 0) in hand, 40 of its actions left
    clock.sleep(5 * PERIOD_NS / 1e9)
    executor.run(10)
    second = executor.records()[10:]
    first_tick = int(second["tick"][0])
    assert first_tick > 10  # ticks passed in the pause
    # A request at once, answered 3 ticks on; the pre-pause chunk is never used again.
    assert second["chunk_obs_id"].tolist() == [NO_CHUNK] * 3 + [first_tick] * 7
    assert executor.counters.starved_ticks == 0


def test_after_a_pause_the_arms_hold_where_the_rig_left_them() -> None:
    # Between episodes the rig resets the arms (START, grippers open); run 1 ended elsewhere, its left gripper closed.
    executor, robot, client, clock = make(chunk=50, threshold=25, latency_ticks=3, blend=BlendConfig())

    def away(actions: np.ndarray) -> np.ndarray:
        out = actions.copy()
        out[:, 0], out[:, 6] = 0.01 * (np.arange(len(out)) + 1), 0.0
        return out

    client.transform = away
    executor.run(60)
    assert robot.qpos[0] > 0.1 and robot.qpos[6] == 0.0
    reset = START.copy()
    reset[[6, 13]] = 1.0
    robot.qpos = reset.copy()
    clock.sleep(2.0)
    executor.run(3)  # holding until the run's own first chunk comes
    np.testing.assert_array_equal(np.array(robot.commands[-3:]), np.tile(reset, (3, 1)))


def test_a_run_begun_within_a_period_of_its_next_deadline_runs_that_tick_late_and_keeps_the_chunk() -> None:
    executor, _, _, clock = make(chunk=50, threshold=8, latency_ticks=3)
    executor.run(10)  # a chunk (obs 0) in hand; the clock at tick 9's deadline
    clock.now += PERIOD_NS + PERIOD_NS // 2  # tick 10's deadline passed half a period ago: late, not paused
    executor.run(5)
    first, second = executor.records()[:10], executor.records()[10:]
    assert second["tick"].tolist() == list(range(10, 15))
    last = int(first["action_index"][-1])
    assert (second["chunk_obs_id"] == 0).all() and second["action_index"].tolist() == list(range(last + 1, last + 6))
    assert executor.counters.missed_ticks == 0


def test_a_boundary_open_at_a_pause_counts_only_the_steps_its_run_commanded() -> None:
    executor, robot, client, clock = make(chunk=50, threshold=25, latency_ticks=3, blend=BlendConfig())

    def away(actions: np.ndarray) -> np.ndarray:
        out = actions.copy()
        out[:, 0] = 0.01 * (np.arange(len(out)) + 1)
        return out

    client.transform = away
    executor.run(33)  # ends 3 ticks into the cross-fade of the boundary at tick 30
    robot.qpos = START.copy()  # the rig puts the arms back (0.33 rad on the waist) during the pause
    clock.sleep(2.0)
    executor.run(3)
    commands = np.array(robot.commands[:33])
    largest_step = np.abs(np.diff(commands[29:], axis=0))[:, :6].max()
    assert executor.boundaries()[-1].tick == 30
    assert executor.boundaries()[-1].commanded_jump == pytest.approx(largest_step)


def test_back_to_back_runs_of_one_tick_measure_the_round_trip() -> None:
    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3, adaptive_prefetch=True)
    for _ in range(40):
        executor.run(1)
    assert executor.latency_ms == pytest.approx(120.0)


def test_starvation_with_replies_by_the_next_tick_on_a_lockstep_clock_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A simulation's clock moves only as the robot is commanded: a reply polled on the tick after its capture
    # measures a round trip of 0 ms. The server answers twice, then stalls.
    clock = FakeClock()

    class LockstepRobot(FakeRobot):
        def command(self, qpos_target: np.ndarray) -> None:
            super().command(qpos_target)
            clock.now += PERIOD_NS

    class TwoRepliesSource:
        def __init__(self) -> None:
            self.client, self.pending, self.requests = FakeClient(chunk=20), None, 0

        @property
        def busy(self) -> bool:
            return self.pending is not None or self.requests >= 2

        def submit(self, request: ChunkRequest) -> None:
            self.requests += 1
            self.pending = request_chunk(self.client, PARAMS, request)

        def poll(self) -> Outcome | None:
            outcome, self.pending = self.pending, None
            return outcome

    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=8, adaptive_prefetch=True)
    executor = ChunkExecutor(
        LockstepRobot(clock),
        TwoRepliesSource(),
        SafetyFilter(SafetyConfig()),
        config,
        clock=clock,
        sleep=lambda _: None,
    )
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(80)
    assert executor.counters.ticks == 80 and executor.counters.starved_ticks > 0
    starved = [r.getMessage() for r in caplog.records if "starved" in r.getMessage()]
    assert "round trip 0 ms" in starved[0] and "raise prefetch_threshold" in starved[0]


@pytest.mark.parametrize("pause_s", [0.0, 10.0])
def test_starvation_goes_on_across_back_to_back_runs_and_not_across_a_pause(pause_s: float) -> None:
    executor, _, client, clock = make(chunk=20, threshold=8, latency_ticks=1)
    executor.run(10)
    client.down = True  # no chunk after the one in hand, which runs out within the next run
    executor.run(15)
    starved = executor.counters.starved_ticks
    assert starved > 0
    clock.sleep(pause_s)
    executor.run(5)
    assert executor.counters.starved_ticks - starved == (0 if pause_s else 5)


def test_summaries_count_every_tick_beyond_the_records_kept() -> None:
    executor, _, _, _ = make(chunk=5, threshold=2, latency_ticks=8, record_capacity=8)
    executor.stop("operator")
    first = executor.run(40)  # 40 held ticks, of which 8 are recorded
    executor.run(10)
    assert len(executor.records()) == 8
    assert (first.ticks, first.hold_ticks) == (40, 40)
    whole = executor.summary()
    assert (
        (whole.ticks, whole.hold_ticks, whole.missed_ticks)
        == (50, 50, 0)
        == (
            executor.counters.ticks,
            executor.counters.hold_ticks,
            executor.counters.missed_ticks,
        )
    )


def test_a_robot_slower_than_the_period_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    executor, robot, _, clock = make()
    robot.on_command = lambda n: clock.sleep(0.1)  # each command takes 2.5 periods at 25 Hz
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(100)  # 4 s of fake time: one warning, the rest counted
    warnings = [r.getMessage() for r in caplog.records if "late" in r.getMessage()]
    assert len(warnings) == 1 and "cannot keep 25 Hz" in warnings[0]
    assert executor.counters.missed_ticks > 50


def test_starvation_from_failing_requests_says_so(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, client, _ = make(chunk=20, threshold=8, latency_ticks=1)
    executor.run(10)  # a chunk in hand, then the server goes away
    client.down = True
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(300)  # 12 s of fake time: a starvation warning at once (the request still in flight), then more
    starved = [r.getMessage() for r in caplog.records if "starved" in r.getMessage()]
    assert "Request earlier: raise prefetch_threshold" in starved[0]  # nothing has failed yet
    assert "request(s) since the last chunk failed, the last with FakeTimeout: no reply" in starved[-1]


def test_starvation_while_the_request_in_flight_goes_unanswered_says_the_server_is_not_answering(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class HangsAfterTwo(LatencySource):
        """Answers its first two requests 3 ticks on; the third is never answered (a hung server)."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.requests = 0

        def submit(self, request: ChunkRequest) -> None:
            self.requests += 1
            super().submit(request)
            if self.requests > 2:
                self._pending = (2**62, self._pending[1])  # type: ignore[index]

    executor, _, _, _ = make(chunk=20, threshold=8, latency_ticks=3, source_cls=HangsAfterTwo)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(300)  # 12 s of fake time: the chunks run out at once, the warnings come every 5 s
    starved = [r.getMessage() for r in caplog.records if "starved" in r.getMessage()]
    assert "the server is not answering it" in starved[-1] and "round trip 120 ms" in starved[-1]


def test_starvation_advice_names_the_setting_that_moves_the_prefetch_point(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, client, _ = make(chunk=20, threshold=8, latency_ticks=1, adaptive_prefetch=True, latency_margin=1.2)
    executor.run(10)
    client.down = True
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(30)
    starved = [r.getMessage() for r in caplog.records if "starved" in r.getMessage()]
    # A round trip of 1 tick times 1.2 is below prefetch_threshold's 8 actions: the margin counts from 8 on.
    assert "Request earlier: raise latency_margin (now 1.2; `robot --latency-margin`) above 8, where" in starved[0]


def test_adaptive_prefetch_covers_the_measured_latency() -> None:
    fixed, _, _, _ = make(chunk=20, threshold=2, latency_ticks=10)
    fixed.run(200)
    adaptive, _, _, _ = make(chunk=20, threshold=2, latency_ticks=10, adaptive_prefetch=True)
    adaptive.run(200)
    # Requests 2 actions before the end, 10 ticks of latency: 8 of every 26 ticks held once started.
    assert fixed.counters.starved_ticks > 40
    assert adaptive.latency_ms == pytest.approx(400.0)  # 10 ticks at 25 Hz
    assert adaptive.prefetch_threshold == 15  # ceil(10 ticks x 1.5)
    assert adaptive.counters.starved_ticks <= 10  # only until the first round trip was measured


def test_a_reply_that_came_between_runs_is_no_measure_of_the_round_trip() -> None:
    executor, _, _, clock = make(chunk=20, threshold=8, latency_ticks=3, adaptive_prefetch=True)
    executor.run(40)  # ends with a request in flight
    assert executor.counters.requests == executor.counters.chunks_adopted + 1
    assert executor.latency_ms == pytest.approx(120.0)
    clock.now += 60 * 10**9  # the rig pauses a minute between runs (an episode reset); the reply lands meanwhile
    executor.run(40)
    assert executor.latency_ms == pytest.approx(120.0) and executor.prefetch_threshold == 8


def test_starvation_is_reported_with_latency_and_horizon(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, _, _ = make(chunk=5, threshold=2, latency_ticks=8, adaptive_prefetch=True)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(400)
    warnings = [r.getMessage() for r in caplog.records if "starved" in r.getMessage()]
    assert warnings and "inference round trip 320 ms vs chunk horizon" in warnings[0]
    assert len(warnings) <= 4  # at most one per 5 s of the 16 s run
    assert re.search(r"starved ticks before this one \(\d+ starvation events since the last warning\)", warnings[1])


def test_starvation_past_half_the_horizon_is_named_as_such(caplog: pytest.LogCaptureFixture) -> None:
    # A 1.6 s round trip against a 2 s horizon: each chunk arrives with 0.4 s left, and the next takes 1.6 s again.
    executor, _, _, _ = make(chunk=50, threshold=25, latency_ticks=40, adaptive_prefetch=True)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(200)
    # After the first chunk, 30 of every 80 ticks held: 40 moving on a chunk while the next is computed, it comes
    # with 10 actions left, and the one after it 30 ticks after those ran out.
    assert executor.counters.starved_ticks > 50 and executor.prefetch_threshold == 49
    warning = next(r.getMessage() for r in caplog.records if "starved" in r.getMessage())
    assert "round trip 1600 ms vs chunk horizon 2000 ms" in warning
    assert "starves whenever the round trip exceeds half the chunk horizon (1000 ms here)" in warning
    assert "make inference faster" in warning and "longer chunks" in warning


def test_starvation_within_half_the_horizon_asks_for_an_earlier_request(caplog: pytest.LogCaptureFixture) -> None:
    executor, _, _, _ = make(chunk=20, threshold=2, latency_ticks=5)  # 200 ms of a 800 ms horizon, asked too late
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.executor"):
        executor.run(100)
    warning = next(r.getMessage() for r in caplog.records if "starved" in r.getMessage())
    assert "raise prefetch_threshold" in warning and "half the chunk horizon" not in warning


def test_the_boundary_a_run_ends_in_is_reported_with_the_ticks_it_had() -> None:
    # A stop latched by the rate limit inside a boundary's window ends the run there: its report must show it.
    clock = FakeClock()
    client, safety = FakeClient(chunk=20), SafetyFilter(SafetyConfig(stop_after_rate_limited_ticks=3))
    config = ExecutorConfig(control_rate_hz=RATE_HZ, prefetch_threshold=8, adaptive_prefetch=False)
    source = LatencySource(client, clock, 3)
    executor = ChunkExecutor(FakeRobot(clock), source, safety, config, clock=clock, sleep=clock.sleep)
    offset_chunks(client, [0.0, 1.5])  # the second chunk far off: the fade asks for more than the slew limit
    executor.run(60, until=lambda: safety.stopped)  # as `robot` runs it
    assert safety.stopped and executor.counters.chunks_adopted == len(executor.boundaries()) == 2
    assert executor.boundaries()[-1].safety_ticks == 3


def blended(blender: ChunkBlender, actions: np.ndarray, first_tick: int, ticks: range, last: np.ndarray) -> np.ndarray:
    """The first joint's target at each of `ticks` for the chunk `actions` from `first_tick`, each one commanded."""
    targets = []
    for tick in ticks:
        target = blender.target(tick, actions[tick - first_tick], last)
        assert target is not None
        targets.append(float(target[0]))
        last = target
    return np.array(targets)


def test_a_fade_from_a_chunk_that_stops_moving_mid_window_keeps_a_constant_step() -> None:
    ramp = np.arange(40, dtype=np.float64)[:, None]  # 1 per tick
    blender = ChunkBlender(BlendConfig(window_ticks=8))
    blender.switch(10, ramp + 15, 10, ramp[:13], 0, np.array([9.0]))  # the old chunk's last action is at tick 12
    steps = np.diff([9.0, *blended(blender, ramp + 15, 10, range(10, 25), np.array([9.0]))])
    assert steps[:9] == pytest.approx([1 + 5 / 9] * 9) and steps[9:] == pytest.approx([1.0] * 6)


def test_a_rejoin_into_a_chunk_delayed_past_the_rejoin_tick_moves_on_without_a_backward_step() -> None:
    ramp = np.arange(40, dtype=np.float64)[:, None]
    blender = ChunkBlender(BlendConfig(window_ticks=8))
    blender.rejoin(12, 5, ramp, 10, np.array([0.0]))  # the chunk delayed by 5 ticks starts at tick 15
    steps = np.diff([0.0, *blended(blender, ramp, 10, range(12, 24), np.array([0.0]))])
    assert np.all(steps > 0) and steps[-1] == pytest.approx(1.0)
