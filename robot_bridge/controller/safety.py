"""Controller-side safety layer for ALOHA joint-position commands.

Every command the executor sends passes through `SafetyFilter.apply`, which in order:

1. picks the target: the chunk action, or the hold pose when there is no valid action (no chunk, a
   non-finite action, or the latched stop) or no valid measurement (a non-finite joint reading: the arm
   does not move blind); an arm joint whose reading jumped more than three steps since its last reading, faster
   than the arm moves (an encoder or bus glitch), is set aside, the command limited around the last command
   instead, and one that stays so more than `implausible_reading_ticks` ticks in a row latches the stop (a fault,
   or a wrapped angle: no arm moves that fast, and commanding towards such a reading would be a jump);
2. clamps every joint to its position limits and each gripper to its normalised range;
3. limits the change of each arm joint per tick relative to the *measured* joint position, turning the
   official Cosmos Policy client's "pause if any non-gripper joint would move more than 0.15 rad"
   check into a slew limit, and relative to the previous command as well while the arm is within two
   steps of it: a servo lagging behind its goal would otherwise be sent goals up to two steps apart
   (farther, as for an arm pushed away, the measured pose rules). The slew limit comes last, so that nothing
   jumps: an arm pushed outside its limits during a run is commanded back one step per tick (an
   Interbotix driver refuses a goal outside its own limits, so such an arm keeps its last goal until
   the commands are inside them again).

The first command is refused (`check_start_pose`) when an arm joint is measured outside its limits by more than
`START_POSE_TOLERANCE`: bringing it back would be a motion at the full slew rate that no policy asked for, before
the operator has seen the policy drive the arms.

The hold pose is the last command sent, not the measured position: re-commanding the measured pose
each tick lets gravity sag accumulate, because a loaded position servo settles slightly below its goal.
The stop latch holds position too; it never disables torque, since the arms have no brakes and
collapse when torque is off (ALOHA README).

Grippers get no slew limit: the ALOHA observation normalises finger *position* while the action
normalises the gripper *joint* angle (`real_env.py`), so a difference between the two is not a motion.
The grippers are protected in hardware by their current limit instead.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cosmos_edge.robot_bridge.controller.throttle import Throttle
from cosmos_edge.runtime.checks import check_integer, check_number, check_numbers
from cosmos_edge.runtime.errors import ConfigError, InputError

_LOG = logging.getLogger(__name__)

# vx300s follower arm joint limits in rad: waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate.
# Source: Interbotix/interbotix_ros_manipulators
# interbotix_xsarm_descriptions/urdf/aloha_vx300s.urdf.xacro @41746ab1 (±(π − 1e-5), [−106°, 72°],
# [−101°, 92°], ±(π − 1e-5), [−107°, 128°], ±(π − 1e-5)); mujoco_menagerie's aloha.xml uses the same values.
# Real rigs may be stricter (firmware limits, table collisions): configure per rig.
_PI_OFFSET = 1e-5
# How far outside its limits an arm joint may be measured at the start: encoder noise and a servo settled against
# a limit, not a pose the filter would have to move the arm out of.
START_POSE_TOLERANCE = 0.02  # rad
_ARM_JOINT_NAMES = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate")
VX300S_JOINT_LOWER: tuple[float, ...] = (
    -math.pi + _PI_OFFSET,
    math.radians(-106.0),
    math.radians(-101.0),
    -math.pi + _PI_OFFSET,
    math.radians(-107.0),
    -math.pi + _PI_OFFSET,
)
VX300S_JOINT_UPPER: tuple[float, ...] = (
    math.pi - _PI_OFFSET,
    math.radians(72.0),
    math.radians(92.0),
    math.pi - _PI_OFFSET,
    math.radians(128.0),
    math.pi - _PI_OFFSET,
)
# Per-tick joint change the official Cosmos Policy ALOHA client tolerates before pausing (run_aloha_eval.py).
DEFAULT_MAX_JOINT_STEP = 0.15
# The most `max_joint_step` may be: 0.5 rad per tick is 12.5 rad/s at 25 Hz, beyond any ALOHA joint; more is a typo
# (1.5 for 0.15), not a limit.
MAX_JOINT_STEP_LIMIT = 0.5
# How far from the last command an arm joint may be measured after a pause and still count as not moved: a loaded
# servo settles a few hundredths of a radian below its goal; an episode reset moves the arms much more.
MOVED_TOLERANCE = 0.05  # rad
WARNING_INTERVAL_S = 5.0  # least time between two warnings of the same interventions' onset, as the executor's
NUM_ARMS = 2  # ALOHA layout: [left 6 joints, left gripper, right 6 joints, right gripper]


class Intervention(enum.Flag):
    """What the filter changed in one command; several can apply to the same tick."""

    NONE = 0
    CLAMPED = enum.auto()  # a joint or gripper was outside its limits
    RATE_LIMITED = enum.auto()  # an arm joint would have moved more than the per-tick maximum
    HELD = enum.auto()  # no valid action: the hold pose was commanded
    NON_FINITE = enum.auto()  # NaN/inf in the action or the measured position
    STOPPED = enum.auto()  # the stop latch is set: the hold pose was commanded
    IMPLAUSIBLE_READING = enum.auto()  # an arm joint's reading jumped farther than the arm moves: its last one used


@dataclass(frozen=True)
class SafetyConfig:
    """Limits for a bimanual ALOHA command vector (14 values for 6-joint arms).

    Args:
        joint_lower: lower position limit of each arm joint in rad, the left arm's and, unless
            `right_joint_lower` is given, the right arm's (default: vx300s, see `VX300S_JOINT_LOWER`).
        joint_upper: upper position limit of each arm joint in rad, likewise (default: vx300s).
        right_joint_lower, right_joint_upper: the right arm's own limits, for a rig whose arms are not
            limited alike (a table edge on one side: mirrored waist limits); default: the left arm's.
        gripper_range: allowed normalised gripper command (default (0, 1): 0 closed, 1 open).
        max_joint_step: largest change of an arm joint per tick in rad, relative to the measured
            position and to the previous command (default 0.15, the official client's pause threshold; at
            most 0.5).
        stop_after_rate_limited_ticks: latch a stop once the policy's target has been rate limited this
            many ticks in a row (a chunk asking for motion faster than the limit allows, which the official
            client pauses on at once); default None: the arm follows such a chunk at the limit.
        implausible_reading_ticks: ticks in a row an arm joint's reading may stay more than three steps from its
            last plausible reading and be taken as a glitch (set aside, the command limited around the last one:
            the rate limit would otherwise command a jump towards it); one that stays longer latches the stop, the
            last command held (a resume within the run latches it again while the reading stays; a run after a
            pause takes the readings afresh). Default 3 (120 ms at 25 Hz); 0 takes every reading as it is.
    """

    joint_lower: tuple[float, ...] = VX300S_JOINT_LOWER
    joint_upper: tuple[float, ...] = VX300S_JOINT_UPPER
    gripper_range: tuple[float, float] = (0.0, 1.0)
    max_joint_step: float = DEFAULT_MAX_JOINT_STEP
    right_joint_lower: tuple[float, ...] | None = None
    right_joint_upper: tuple[float, ...] | None = None
    stop_after_rate_limited_ticks: int | None = None
    implausible_reading_ticks: int = 3

    def __post_init__(self) -> None:
        check_integer("safety.implausible_reading_ticks", self.implausible_reading_ticks, 0)
        check_numbers("safety.gripper_range", self.gripper_range, length=2)
        check_integer("safety.stop_after_rate_limited_ticks", self.stop_after_rate_limited_ticks, 1, or_none=True)
        check_number("safety.max_joint_step", self.max_joint_step, 0, MAX_JOINT_STEP_LIMIT, above_low=True)
        for prefix in ("", "right_"):
            lower, upper = self.arm_limits(1 if prefix else 0)
            check_numbers(f"safety.{prefix}joint_lower", lower)
            check_numbers(f"safety.{prefix}joint_upper", upper)
            if len(lower) != len(upper) or not lower:
                raise ConfigError(
                    f"safety.{prefix}joint_lower/{prefix}joint_upper: expected one lower and one upper limit per arm "
                    f"joint (the defaults: {len(VX300S_JOINT_LOWER)}, the ViperX 300 S's), got {len(lower)} lower and "
                    f"{len(upper)} upper"
                )
            if len(lower) != len(self.joint_lower):
                raise ConfigError(
                    f"safety.{prefix}joint_lower/{prefix}joint_upper: expected one limit per arm joint, as "
                    f"joint_lower's {len(self.joint_lower)}, got {len(lower)}"
                )
            for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
                if not lo < hi:
                    raise ConfigError(
                        f"safety.{prefix}joint limits: expected lower < upper for joint {i}, got [{lo}, {hi}]"
                    )
        lo, hi = self.gripper_range
        if not 0.0 <= lo < hi <= 1.0:  # commands are normalised openings: 0 closed, 1 open
            raise ConfigError(
                f"safety.gripper_range: expected 0 <= lower < upper <= 1 (normalised opening), got {self.gripper_range}"
            )

    @property
    def dims(self) -> int:
        return NUM_ARMS * (len(self.joint_lower) + 1)

    @property
    def gripper_indices(self) -> tuple[int, ...]:
        per_arm = len(self.joint_lower) + 1
        return tuple(arm * per_arm + per_arm - 1 for arm in range(NUM_ARMS))

    def arm_limits(self, arm: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(lower, upper) joint limits of arm 0 (left) or 1 (right)."""
        if arm == 0:
            return self.joint_lower, self.joint_upper
        lower = self.joint_lower if self.right_joint_lower is None else self.right_joint_lower
        upper = self.joint_upper if self.right_joint_upper is None else self.right_joint_upper
        return lower, upper

    def lower(self) -> np.ndarray:
        """Per-dimension lower limits, shape (dims,)."""
        limits = [(*self.arm_limits(arm)[0], self.gripper_range[0]) for arm in range(NUM_ARMS)]
        return np.array([value for arm in limits for value in arm], dtype=np.float64)

    def upper(self) -> np.ndarray:
        """Per-dimension upper limits, shape (dims,)."""
        limits = [(*self.arm_limits(arm)[1], self.gripper_range[1]) for arm in range(NUM_ARMS)]
        return np.array([value for arm in limits for value in arm], dtype=np.float64)


@dataclass(frozen=True)
class SafetyCounters:
    """Commands that needed each kind of intervention since the filter was built."""

    commands: int = 0
    clamped: int = 0
    rate_limited: int = 0
    held: int = 0
    non_finite: int = 0
    stopped: int = 0
    implausible_readings: int = 0


@dataclass(frozen=True)
class SafeCommand:
    """`qpos` (dims,) float64 is a new array the caller may keep; `flags` says what the filter changed."""

    qpos: np.ndarray
    flags: Intervention


_COUNTED = (
    Intervention.CLAMPED,
    Intervention.RATE_LIMITED,
    Intervention.HELD,
    Intervention.NON_FINITE,
    Intervention.STOPPED,
    Intervention.IMPLAUSIBLE_READING,
)


class SafetyFilter:
    """Applies `SafetyConfig` to every command; see the module docstring for the order of checks.

    `apply` runs on the control thread; `stop` may be called from any thread.
    """

    def __init__(self, config: SafetyConfig, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.config = config
        self._clock = clock  # nanoseconds, for the warnings' interval
        self._lower = config.lower()
        self._upper = config.upper()
        self._joint_mask = np.ones(config.dims, dtype=bool)
        self._joint_mask[list(config.gripper_indices)] = False
        # A plain flag, not an Event: `stop` may run in a signal handler, which must take no lock the interrupted
        # code (`clear_stop`, on the same thread) could hold.
        self._stopped = False
        self._stop_reason, self._stop_announced = "", False
        self._last: np.ndarray | None = None  # last command sent; None until the first command
        self._prev_flags = Intervention.NONE
        self._onset_warnings: dict[Intervention, Throttle] = {}
        self._counts = dict.fromkeys(_COUNTED, 0)
        self._commands = 0
        self._rate_limited_run = 0  # ticks in a row whose policy target was rate limited
        self._resync = False  # `restart` was called: the next valid reading may show arms moved since the last command
        self._reading: np.ndarray | None = None  # the last reading taken as the arm's pose
        self._jump_run = np.zeros(config.dims, dtype=np.int64)  # ticks in a row each joint's reading jumped
        self._jump_warnings = Throttle(WARNING_INTERVAL_S)
        self._blind_warnings = Throttle(WARNING_INTERVAL_S)

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_reason(self) -> str:
        """Why the stop latched (empty before any stop)."""
        return self._stop_reason

    @property
    def counters(self) -> SafetyCounters:
        c = self._counts
        return SafetyCounters(
            commands=self._commands,
            clamped=c[Intervention.CLAMPED],
            rate_limited=c[Intervention.RATE_LIMITED],
            held=c[Intervention.HELD],
            non_finite=c[Intervention.NON_FINITE],
            stopped=c[Intervention.STOPPED],
            implausible_readings=c[Intervention.IMPLAUSIBLE_READING],
        )

    def stop(self, reason: str) -> None:
        """Latch a stop: every later command holds position until `clear_stop`. Sets flags only (a signal handler may
        call it); the latch is logged by `announce_stop`, on the control thread."""
        if not self._stopped:
            self._stop_reason, self._stop_announced = reason, False
            self._stopped = True

    def announce_stop(self) -> None:
        """Logs a latched stop, once per latch (`apply` calls it; so does the executor when its run ends)."""
        if self._stopped and not self._stop_announced:
            self._stop_announced = True
            _LOG.warning(
                "safety: stop latched (%s); holding position until cleared or the end of the run", self._stop_reason
            )

    def restart(self) -> None:
        """After a pause in which the rig may have moved the arms (an episode reset): the next command checks whether
        an arm joint is measured more than `MOVED_TOLERANCE` from the last command. If so, the last command is
        forgotten: that command holds the pose then measured, after the start pose check, as the first one did.
        Otherwise (or with no valid reading) it holds the last command, as ever: no sag, the grippers keep their
        grip."""
        self._resync = True
        self._rate_limited_run = 0
        self._reading = None  # the rig may have moved the arms: their next reading is no jump

    def clear_stop(self) -> None:
        """Clear the stop latch. The hold pose stays the last command: the measured pose would let the grippers go
        (they measure finger position, and grip by being commanded past it) and the arms sag."""
        if self._stopped:
            _LOG.warning("safety: stop latch cleared")
        self._stopped = False
        self._rate_limited_run = 0  # a run of rate-limited targets starts again

    def apply(self, target: np.ndarray | None, measured_qpos: np.ndarray) -> SafeCommand:
        """Make `target` (dims,) safe to send given the measured position (dims,); None means hold.

        Raises InputError if the measured position is not finite before any command was sent, since
        there is then no pose to hold.
        """
        measured, blind, flags = self._reference_pose(measured_qpos)
        hold = measured if self._last is None else self._last
        out, flags = self._requested(target, hold, blind, flags)
        out, flags = self._limited(out, measured, flags)
        self._last = out
        self._record(flags, target, out)
        self._count_rate_limited_run(flags)
        return SafeCommand(qpos=out.copy(), flags=flags)

    def _reference_pose(self, measured_qpos: np.ndarray) -> tuple[np.ndarray, bool, Intervention]:
        """The pose the command is limited around: the reading (an implausible jump set aside), or the last command
        when the reading is not finite ("blind"); and the interventions that took."""
        measured = np.asarray(measured_qpos, dtype=np.float64)
        self._check_shape("measured qpos", measured)
        flags = Intervention.NONE
        blind = not np.isfinite(measured).all()
        if blind:
            if self._last is None:
                raise InputError(f"safety: measured qpos is not finite and no command was sent yet: {measured}")
            flags |= Intervention.NON_FINITE
            if self._blind_warnings.due(self._clock()) is not None:
                _LOG.warning(
                    "safety: qpos%s read not finite: the last command is held (no motion without a reading)",
                    np.flatnonzero(~np.isfinite(measured)).tolist(),
                )
            return self._last, blind, flags  # the only trustworthy reference left
        measured, implausible = self._plausible(measured)
        flags |= Intervention.IMPLAUSIBLE_READING if implausible else Intervention.NONE
        if self._resync:
            self._resync = False
            moved = self._last is not None and np.abs(measured - self._last)[self._joint_mask].max() > MOVED_TOLERANCE
            self._last = None if moved else self._last
        if self._last is None:
            self.check_start_pose(measured)
        return measured, blind, flags

    def _requested(
        self, target: np.ndarray | None, hold: np.ndarray, blind: bool, flags: Intervention
    ) -> tuple[np.ndarray, Intervention]:
        """The command asked for before any limit: `target`, or `hold` when stopped, holding, blind or not finite."""
        if self._stopped:
            self.announce_stop()
            return hold.copy(), flags | Intervention.STOPPED
        if target is None or blind:
            return hold.copy(), flags | Intervention.HELD
        out = np.asarray(target, dtype=np.float64).copy()
        self._check_shape("target", out)
        if not np.isfinite(out).all():
            return hold.copy(), flags | Intervention.NON_FINITE | Intervention.HELD
        return out, flags

    def _limited(self, out: np.ndarray, measured: np.ndarray, flags: Intervention) -> tuple[np.ndarray, Intervention]:
        """`out` within the joint limits, and each arm joint within a step of the reference pose."""
        clamped = np.clip(out, self._lower, self._upper)
        if not np.array_equal(clamped, out):
            out = clamped
            flags |= Intervention.CLAMPED
        step = self.config.max_joint_step
        joints = self._joint_mask
        low, high = measured[joints] - step, measured[joints] + step
        if self._last is not None:
            # Within a step of the previous command too, wherever that range meets the measured pose's inside the
            # limits (a servo lagging behind its goal); elsewhere (an arm pushed away, a glitching encoder, a last
            # command outside the limits) the measured pose rules.
            near_low, near_high = (
                np.maximum(low, self._last[joints] - step),
                np.minimum(high, self._last[joints] + step),
            )
            meet = np.maximum(near_low, self._lower[joints]) <= np.minimum(near_high, self._upper[joints])
            low, high = np.where(meet, near_low, low), np.where(meet, near_high, high)
        limited = np.clip(out[joints], low, high)
        if not np.array_equal(limited, out[joints]):
            out[joints] = limited
            flags |= Intervention.RATE_LIMITED
        return out, flags

    def _plausible(self, measured: np.ndarray) -> tuple[np.ndarray, bool]:
        """The pose the command is limited around: the reading, but for an arm joint read more than three steps from
        its last plausible reading, which is set aside for the last command (where an arm that follows its goals is;
        its last reading would stall the joint until the glitch ends) and latches the stop after
        `implausible_reading_ticks` ticks in a row. And whether one was set aside."""
        previous, limit = self._reading, self.config.implausible_reading_ticks
        if previous is None or limit == 0 or self._last is None:  # before the first command, every reading stands
            self._reading = measured  # (and after a restart: a run of jumps before it does not count against later)
            self._jump_run[:] = 0
            return measured, False
        # Three steps: the simulation's arms, driven at the slew limit, move a little over two in a tick (the demo
        # saw 0.34 rad); a vx300s joint at most about one (pi rad/s at 25 Hz).
        jumped = self._joint_mask & (np.abs(measured - previous) > 3 * self.config.max_joint_step)
        self._jump_run = np.where(jumped, self._jump_run + 1, 0)
        self._reading = np.where(jumped, previous, measured)
        if not jumped.any():
            return self._reading, False
        reference = np.where(jumped, self._last, measured)
        stuck = self._jump_run > limit
        dim = int(np.flatnonzero(stuck if stuck.any() else jumped)[0])
        off = f"qpos[{dim}] read {measured[dim]:.3f} rad, {abs(measured[dim] - previous[dim]):.3f} from its last "
        off += "plausible reading"
        if stuck.any() and not self._stopped:
            self.stop(
                f"{off} for {self._jump_run[dim]} ticks, faster than the arm moves (an encoder or bus fault, or a "
                "wrapped angle); the last command is held"
            )
        elif (count := self._jump_warnings.due(self._clock())) is not None:
            _LOG.warning(
                "safety: %s, faster than the arm moves: set aside, the command limited around the last one (for %d "
                "ticks at most, then the stop latches; readings set aside since the last warning: %d)",
                off,
                limit,
                count,
            )
        return reference, True

    def _count_rate_limited_run(self, flags: Intervention) -> None:
        """Latches the stop `stop_after_rate_limited_ticks` asks for; holds, stops and readings set aside (a tick the
        filter cannot judge the policy on) end a run."""
        policy_target = not flags & (Intervention.HELD | Intervention.STOPPED | Intervention.IMPLAUSIBLE_READING)
        limited = policy_target and Intervention.RATE_LIMITED in flags
        self._rate_limited_run = self._rate_limited_run + 1 if limited else 0
        limit = self.config.stop_after_rate_limited_ticks
        if limit is not None and self._rate_limited_run >= limit:
            self._rate_limited_run = 0
            self.stop(f"the policy's target was rate limited {limit} ticks in a row")

    def check_start_pose(self, measured_qpos: np.ndarray) -> None:
        """Raises InputError naming each arm joint measured more than `START_POSE_TOLERANCE` outside its limits, or
        any joint whose reading is not finite (there is then no pose to hold)."""
        measured = np.asarray(measured_qpos, dtype=np.float64)
        self._check_shape("measured qpos", measured)
        if not np.isfinite(measured).all():
            dims = np.flatnonzero(~np.isfinite(measured)).tolist()
            raise InputError(
                f"start pose: qpos{dims} read not finite; nothing was commanded (check the rig's readings)"
            )
        joints = self._joint_mask
        tolerance = START_POSE_TOLERANCE
        outside = joints & ((measured < self._lower - tolerance) | (measured > self._upper + tolerance))
        if not outside.any():
            return
        per_arm = len(self.config.joint_lower) + 1
        named = []
        for dim in np.flatnonzero(outside):
            arm, joint = ("left", "right")[dim // per_arm], dim % per_arm
            name = _ARM_JOINT_NAMES[joint] if per_arm == len(_ARM_JOINT_NAMES) + 1 else f"joint {joint}"
            named.append(
                f"{arm} {name} (qpos[{dim}]) at {measured[dim]:.3f} rad, limits "
                f"[{self._lower[dim]:.3f}, {self._upper[dim]:.3f}]"
            )
        raise InputError(
            "safety: the arms start outside their joint limits: "
            + "; ".join(named)
            + ": move them within the limits first, or widen the limits (joint_lower/joint_upper)"
        )

    def _check_shape(self, name: str, array: np.ndarray) -> None:
        if array.shape != (self.config.dims,):
            raise InputError(f"safety: {name} expected shape ({self.config.dims},), got {array.shape}")

    def _record(self, flags: Intervention, target: np.ndarray | None, out: np.ndarray) -> None:
        self._commands += 1
        for kind in _COUNTED:
            if kind in flags:
                self._counts[kind] += 1
        if flags:
            # Onsets are warnings, at most one per combination of interventions per interval (a policy that keeps
            # overshooting must not flood the log); a run of the same interventions (a long hold, a slewing joint)
            # is debug.
            started = flags & ~self._prev_flags
            onsets = self._onset_warnings.setdefault(flags, Throttle(WARNING_INTERVAL_S)) if started else None
            count = None if onsets is None else onsets.due(self._clock())
            log = _LOG.debug if count is None else _LOG.warning
            since = f" ({count} onsets since the last such warning)" if count is not None and count > 1 else ""
            log("safety: %s%s%s", _names(flags), _changed(target, out), since)
        self._prev_flags = flags


def _names(flags: Intervention) -> str:
    return "+".join(flag.name or "" for flag in Intervention if flag and flag in flags)


def _changed(target: np.ndarray | None, out: np.ndarray) -> str:
    """Which dims the filter changed and by how much at most, instead of two whole vectors."""
    if target is None:
        return " (no action: holding the last pose)"
    asked = np.asarray(target, dtype=np.float64)
    if asked.shape != out.shape or not np.isfinite(asked).all():
        return f" (target not finite or not {out.shape[0]} values)"
    dims = np.flatnonzero(asked != out)
    if dims.size == 0:
        return ""
    return f" on dims {dims.tolist()}, the target cut by up to {np.abs(asked - out).max():.3f}"
