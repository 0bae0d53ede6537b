import logging
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cosmos_edge.robot_bridge.controller.safety import (
    DEFAULT_MAX_JOINT_STEP,
    VX300S_JOINT_LOWER,
    VX300S_JOINT_UPPER,
    WARNING_INTERVAL_S,
    Intervention,
    SafetyConfig,
    SafetyCounters,
    SafetyFilter,
)
from cosmos_edge.runtime.errors import ConfigError, InputError

# ALOHA START_ARM_POSE per arm, grippers half open.
START = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
# Readings that jump are taken as they are: the tests of what the filter does once it takes them as the arm's pose.
TAKEN_AS_READ = SafetyConfig(implausible_reading_ticks=0)
STRICT_SHOULDERS = SafetyConfig(joint_lower=(-3.142, -1.0, -1.763, -3.142, -1.868, -3.142), implausible_reading_ticks=0)
GRIPPERS = [6, 13]
JOINTS = [i for i in range(14) if i not in GRIPPERS]


def test_default_config_matches_aloha_layout() -> None:
    config = SafetyConfig()
    assert config.dims == 14
    assert config.gripper_indices == (6, 13)
    lower, upper = config.lower(), config.upper()
    assert lower[1] == pytest.approx(math.radians(-106)) and upper[1] == pytest.approx(math.radians(72))
    assert lower[8] == lower[1] and upper[12] == upper[5]
    assert (lower[GRIPPERS], upper[GRIPPERS]) == (pytest.approx([0, 0]), pytest.approx([1, 1]))
    assert config.max_joint_step == DEFAULT_MAX_JOINT_STEP == 0.15


@pytest.mark.parametrize(
    "kwargs",
    [
        {"joint_lower": (0.0,), "joint_upper": (1.0, 2.0)},
        {"joint_lower": (1.0,), "joint_upper": (0.0,)},
        {"gripper_range": (1.0, 0.0)},
        {"max_joint_step": 0.0},
        {"max_joint_step": math.inf},
        {"max_joint_step": 1.5},  # a typo of 0.15: no limit at 25 Hz
        {"max_joint_step": "0.1"},
        {"joint_lower": ("0",) * 6},
        {"joint_upper": (math.nan,) * 6},
        {"joint_lower": 0.0},
        {"gripper_range": (0.0, 0.5, 1.0)},
        {"gripper_range": (0.0, math.inf)},
        {"gripper_range": (-5.0, 5.0)},  # commands are normalised openings in 0..1
        {"right_joint_lower": (0.0,)},  # not one per joint
        {"right_joint_lower": 0.0},
        {"right_joint_upper": (-4.0,) * 6},  # below the lower limits it shares with the left arm
    ],
)
def test_invalid_config_names_the_field(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="safety\\."):
        SafetyConfig(**kwargs)


def test_each_arm_may_have_its_own_limits() -> None:
    left_waist = (-1.0, *VX300S_JOINT_LOWER[1:])
    right_waist_upper = (1.0, *VX300S_JOINT_UPPER[1:])  # mirrored: a table edge on each side
    config = SafetyConfig(joint_lower=left_waist, right_joint_upper=right_waist_upper)
    lower, upper = config.lower(), config.upper()
    assert (lower[0], upper[0]) == (-1.0, VX300S_JOINT_UPPER[0])  # left: its own lower, the default upper
    assert (lower[7], upper[7]) == (-1.0, 1.0)  # right: the shared lower, its own upper
    out = SafetyFilter(config).apply(np.full(14, 0.1) + np.eye(14)[7] * 1.2, np.full(14, 0.1) + np.eye(14)[7] * 0.85)
    assert out.qpos[7] == 1.0 and Intervention.CLAMPED in out.flags


def test_limits_of_another_length_say_how_many_are_expected() -> None:
    with pytest.raises(
        ConfigError,
        match=r"^safety\.joint_lower/joint_upper: expected one lower and one upper limit per "
        r"arm joint \(the defaults: 6, the ViperX 300 S's\), got 2 lower and 6 upper$",
    ):
        SafetyConfig(joint_lower=(0.0, 0.0))
    with pytest.raises(ConfigError, match=r"right_joint_lower/right_joint_upper: .* as joint_lower's 6, got 5$"):
        SafetyConfig(right_joint_lower=VX300S_JOINT_LOWER[:5], right_joint_upper=VX300S_JOINT_UPPER[:5])


def test_a_limit_of_the_wrong_type_is_named_with_what_was_expected() -> None:
    expected = "safety.max_joint_step: expected a finite number in (0, 0.5], got '0.1' (str)"
    with pytest.raises(ConfigError, match=f"^{re.escape(expected)}$"):
        SafetyConfig(max_joint_step="0.1")  # type: ignore[arg-type]


def test_in_range_command_passes_unchanged() -> None:
    f = SafetyFilter(SafetyConfig())
    target = START + 0.05
    out = f.apply(target, START)
    np.testing.assert_array_equal(out.qpos, target)
    assert out.flags == Intervention.NONE
    assert f.counters == SafetyCounters(commands=1)


def test_joint_limits_and_gripper_range_clamp() -> None:
    f = SafetyFilter(SafetyConfig(max_joint_step=0.5))
    measured = START.copy()
    measured[1] = math.radians(70)
    target = measured.copy()
    target[1] = 1.5  # shoulder above 72°, within a step of where it is
    target[6] = 1.7  # gripper above open
    target[13] = -0.2  # gripper below closed
    out = f.apply(target, measured)
    assert out.flags == Intervention.CLAMPED
    assert out.qpos[1] == pytest.approx(math.radians(72))
    assert (out.qpos[6], out.qpos[13]) == (1.0, 0.0)
    assert f.counters.clamped == 1


def test_rate_limit_is_relative_to_measured_position_and_skips_grippers() -> None:
    f = SafetyFilter(SafetyConfig())
    target = START.copy()
    target[JOINTS] += 0.4
    target[GRIPPERS] = [1.0, 0.0]  # a full gripper swing in one tick is allowed
    out = f.apply(target, START)
    assert out.flags == Intervention.RATE_LIMITED
    np.testing.assert_allclose(out.qpos[JOINTS], START[JOINTS] + 0.15)
    np.testing.assert_array_equal(out.qpos[GRIPPERS], [1.0, 0.0])
    # Next tick the robot has moved halfway: the bound follows the measurement, not the last command.
    measured = START + 0.075
    out = f.apply(target, measured)
    np.testing.assert_allclose(out.qpos[JOINTS], measured[JOINTS] + 0.15)
    assert f.counters.rate_limited == 2


def test_limits_win_over_rate_limit_when_measured_is_out_of_range() -> None:
    f = SafetyFilter(TAKEN_AS_READ)
    f.apply(START, START)
    measured = START.copy()
    measured[1] = 1.4  # sensor reads past the shoulder limit
    out = f.apply(measured, measured)
    assert out.flags == Intervention.CLAMPED
    assert out.qpos[1] == pytest.approx(math.radians(72))


def test_arms_that_start_outside_their_limits_are_refused_before_any_command() -> None:
    # Bringing them back would be a motion at the full slew rate that no policy asked for.
    f = SafetyFilter(STRICT_SHOULDERS)
    measured = START.copy()
    measured[[1, 8]] = -1.6  # both shoulders rest 0.6 rad below a rig's stricter limit
    message = (
        r"safety: the arms start outside their joint limits: left shoulder \(qpos\[1\]\) at -1\.600 rad, limits "
        r"\[-1\.000, 1\.257\]; right shoulder \(qpos\[8\]\) at -1\.600 rad, .*: move them within the limits first"
        r", or widen the limits \(joint_lower/joint_upper\)$"
    )
    for target in (None, START):
        with pytest.raises(InputError, match=message):
            f.apply(target, measured)
    assert f.counters.commands == 0
    measured[[1, 8]] = -1.0 - 0.019  # within the tolerance: a servo settled against the limit
    assert f.apply(None, measured).flags == Intervention.HELD | Intervention.CLAMPED


def test_an_arm_pushed_outside_its_limits_is_brought_back_a_step_per_tick_not_in_a_jump() -> None:
    config = STRICT_SHOULDERS
    f = SafetyFilter(config)
    f.apply(None, START)
    measured = START.copy()
    measured[[1, 8]] = -1.6  # both shoulders pushed 0.6 rad below the limit during the run
    out = f.apply(None, measured)  # the hold pose (the last command) is within the limits: one step towards it
    assert out.flags == Intervention.HELD | Intervention.RATE_LIMITED
    np.testing.assert_allclose(out.qpos[[1, 8]], -1.6 + config.max_joint_step)
    for _ in range(3):  # each tick a step towards the limit (the arm follows), never past it
        measured = out.qpos
        out = f.apply(measured, measured)
        assert np.all(np.abs(out.qpos[JOINTS] - measured[JOINTS]) <= config.max_joint_step + 1e-12)
    np.testing.assert_allclose(out.qpos[[1, 8]], -1.0)


def test_a_lagging_servo_gets_goals_at_most_a_step_apart() -> None:
    # The servo covers 40 % of its error per tick while the targets alternate far apart: relative to the measured pose
    # alone, consecutive goals would differ by up to two steps.
    config = SafetyConfig()
    f = SafetyFilter(config)
    measured, previous = START.copy(), f.apply(START, START).qpos
    for tick in range(20):
        target = START.copy()
        target[0] = 0.8 if tick % 4 < 2 else -0.8
        out = f.apply(target, measured).qpos
        assert np.abs(out[JOINTS] - previous[JOINTS]).max() <= config.max_joint_step + 1e-12
        assert np.abs(out[JOINTS] - measured[JOINTS]).max() <= config.max_joint_step + 1e-12
        measured, previous = measured + 0.4 * (out - measured), out


def test_a_restarted_filter_holds_the_pose_measured_then_if_the_arms_were_moved() -> None:
    f = SafetyFilter(SafetyConfig())
    gripping = START.copy()
    gripping[6] = 0.0  # the left gripper commanded shut on an object
    f.apply(gripping, START)
    moved = START.copy()
    moved[0] = 0.5  # the rig moved the arm between episodes
    f.restart()
    np.testing.assert_array_equal(f.apply(None, moved).qpos, moved)
    f = SafetyFilter(SafetyConfig())
    f.apply(gripping, START)
    sagged = START.copy()
    sagged[[1, 6]] = START[1] - 0.02, 0.3  # a short pause: the shoulder sagged a little, the object holds the fingers
    f.restart()
    held = f.apply(None, sagged).qpos
    assert held[6] == 0.0 and held[1] == START[1]  # the last command, still: no sag, the grip kept
    f.restart()
    blind = sagged.copy()
    blind[2] = np.nan  # no valid reading after the pause: the last command is held, not an error
    assert f.apply(None, blind).qpos[6] == 0.0


def test_the_previous_command_never_draws_a_goal_outside_the_limits() -> None:
    f = SafetyFilter(TAKEN_AS_READ)
    upper = VX300S_JOINT_UPPER[0]
    f.apply(START, START)
    pushed = START.copy()
    pushed[0] = upper + 0.35  # the waist pushed past its limit: a goal outside them, a step back towards them
    assert f.apply(START, pushed).qpos[0] == pytest.approx(upper + 0.2)
    released = START.copy()
    released[0] = upper - 0.05  # released, measured inside again: the goal stays inside too
    assert f.apply(START, released).qpos[0] == pytest.approx(upper - 0.2)


def test_a_run_of_rate_limited_policy_targets_can_latch_a_stop() -> None:
    f = SafetyFilter(SafetyConfig(stop_after_rate_limited_ticks=3))
    waist = np.eye(14)[0]

    def far(pose: np.ndarray) -> np.ndarray:  # a chunk asking the waist for 0.5 rad this tick
        return pose + 0.5 * waist

    measured = START
    for tick in range(3):
        out = f.apply(far(measured), measured)
        assert Intervention.RATE_LIMITED in out.flags and f.stopped == (tick == 2)
        measured = out.qpos
    assert f.apply(far(measured), measured).flags == Intervention.STOPPED  # held from then on, until reset
    f.clear_stop()
    for _ in range(2):  # the count starts again after a stop, and a hold ends a run
        assert f.apply(far(measured), measured).flags == Intervention.RATE_LIMITED
    f.apply(None, measured)
    for _ in range(2):  # and so does a target within the limit
        f.apply(far(measured), measured)
    assert f.apply(measured + 0.1 * waist, measured).flags == Intervention.NONE
    f.apply(far(measured), measured)
    assert not f.stopped
    with pytest.raises(ConfigError, match=r"safety\.stop_after_rate_limited_ticks: expected an integer"):
        SafetyConfig(stop_after_rate_limited_ticks=0)


def test_clearing_the_stop_starts_the_run_of_rate_limited_targets_again() -> None:
    f = SafetyFilter(SafetyConfig(stop_after_rate_limited_ticks=3))
    far = START + 0.5 * np.eye(14)[0]
    for _ in range(2):
        f.apply(far, START)
    f.stop("operator")
    f.clear_stop()  # within one period: no stopped tick in between
    for _ in range(2):
        f.apply(far, START)
    assert not f.stopped  # 2 in a row since the reset, not 4


def test_hold_uses_measured_pose_first_then_last_command() -> None:
    f = SafetyFilter(SafetyConfig())
    out = f.apply(None, START)
    assert out.flags == Intervention.HELD
    np.testing.assert_array_equal(out.qpos, START)
    sent = f.apply(START + 0.1, START).qpos
    sagged = START + 0.08  # the arm settled slightly short of its goal
    out = f.apply(None, sagged)
    np.testing.assert_array_equal(out.qpos, sent)
    assert f.counters.held == 2


def test_non_finite_target_is_rejected_and_holds() -> None:
    f = SafetyFilter(SafetyConfig())
    sent = f.apply(START, START).qpos
    for bad in (np.nan, np.inf, -np.inf):
        target = START + 0.01
        target[3] = bad
        out = f.apply(target, START)
        assert out.flags == Intervention.NON_FINITE | Intervention.HELD
        np.testing.assert_array_equal(out.qpos, sent)
    assert f.counters.non_finite == 3 and f.counters.held == 3


def test_non_finite_measurement_holds_last_command(caplog: pytest.LogCaptureFixture) -> None:
    f = SafetyFilter(SafetyConfig())
    bad = START.copy()
    bad[0] = np.nan
    with pytest.raises(InputError, match="not finite"):
        f.apply(START, bad)
    sent = f.apply(START, START).qpos
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.safety"):
        out = f.apply(START + 0.05, bad)
    assert out.flags == Intervention.NON_FINITE | Intervention.HELD  # no motion without a reading to check it
    assert "safety: qpos[0] read not finite: the last command is held" in caplog.text  # the joint at fault named
    np.testing.assert_array_equal(out.qpos, sent)
    np.testing.assert_allclose(f.apply(START + 0.05, START).qpos, START + 0.05)  # a valid reading: it moves again


def test_stop_latches_until_cleared() -> None:
    f = SafetyFilter(SafetyConfig())
    sent = f.apply(START + 0.1, START).qpos
    f.stop("operator")
    assert f.stopped
    for _ in range(3):
        out = f.apply(START + 0.12, START + 0.1)
        assert out.flags == Intervention.STOPPED
        np.testing.assert_array_equal(out.qpos, sent)
    f.clear_stop()
    assert not f.stopped
    np.testing.assert_array_equal(f.apply(None, START + 0.08).qpos, sent)  # the last command still holds
    out = f.apply(START + 0.12, START + 0.1)
    assert out.flags == Intervention.NONE
    assert f.counters == SafetyCounters(commands=6, stopped=3, held=1)


def test_shape_mismatch_raises() -> None:
    f = SafetyFilter(SafetyConfig())
    with pytest.raises(InputError, match=r"expected shape \(14,\)"):
        f.apply(np.zeros(7), START)
    with pytest.raises(InputError, match="measured qpos"):
        f.apply(START, np.zeros(16))


def test_returned_command_is_a_copy() -> None:
    f = SafetyFilter(SafetyConfig())
    out = f.apply(START, START)
    out.qpos[:] = 99.0
    np.testing.assert_array_equal(f.apply(None, START).qpos, START)


def test_interventions_are_logged_once_per_onset(caplog: pytest.LogCaptureFixture) -> None:
    f = SafetyFilter(SafetyConfig())
    with caplog.at_level(logging.DEBUG, logger="cosmos_edge.robot_bridge.controller.safety"):
        for _ in range(4):
            f.apply(None, START)
    levels = [r.levelno for r in caplog.records]
    assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG, logging.DEBUG]
    assert "HELD" in caplog.records[0].getMessage()


@settings(max_examples=200, deadline=None)
@given(
    target=arrays(np.float64, 14, elements=st.floats(allow_nan=True, allow_infinity=True, width=64)),
    offset=arrays(np.float64, 14, elements=st.floats(-0.5, 0.5, width=64)),
)
def test_output_always_within_limits_and_step(target: np.ndarray, offset: np.ndarray) -> None:
    config = SafetyConfig()
    f = SafetyFilter(config)
    measured = np.clip(START + offset, config.lower(), config.upper())
    out = f.apply(target, measured).qpos
    assert np.isfinite(out).all()
    assert (out >= config.lower()).all() and (out <= config.upper()).all()
    assert (np.abs(out[JOINTS] - measured[JOINTS]) <= config.max_joint_step + 1e-12).all()


def test_onsets_that_keep_coming_are_warned_about_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0]
    f = SafetyFilter(SafetyConfig(), clock=lambda: now[0])
    target = START.copy()
    target[3] += 0.4  # a step the filter limits
    with caplog.at_level(logging.DEBUG, logger="cosmos_edge.robot_bridge.controller.safety"):
        for tick in range(10):  # a policy overshooting every other tick at 25 Hz: ten onsets of one intervention
            now[0] = tick * 80_000_000
            f.apply(target, START)
            f.apply(START, START)
        now[0] += round(WARNING_INTERVAL_S * 1e9)  # an interval later: warned again, with the count since
        f.apply(target, START)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("RATE_LIMITED" in warning for warning in warnings)
    assert "(10 onsets since the last such warning)" in warnings[1]
    assert f.counters.rate_limited == 11  # every one is counted


def test_intervention_warnings_name_the_dims_not_whole_vectors(caplog: pytest.LogCaptureFixture) -> None:
    safety = SafetyFilter(SafetyConfig())
    home = np.array([0.0, -0.96, 1.16, 0.0, -0.3, 0.0, 0.5] * 2)
    target = home.copy()
    target[3] += 0.4
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.robot_bridge.controller.safety"):
        safety.apply(target, home)
    (message,) = [record.getMessage() for record in caplog.records]
    assert message == "safety: RATE_LIMITED on dims [3], the target cut by up to 0.250"


def commanded_once_and_read_1_rad_off(config: SafetyConfig) -> tuple[SafetyFilter, np.ndarray]:
    """A filter that commanded START, and a reading of the waist 1 rad from it (faster than any arm moves)."""
    f = SafetyFilter(config)
    f.apply(START, START)
    off = START.copy()
    off[0] += 1.0
    return f, off


def test_a_reading_that_jumps_for_a_tick_is_set_aside_rather_than_followed() -> None:
    """An encoder or bus glitch: followed, the rate limit would command the arm 0.85 rad towards it and back."""
    f, glitch = commanded_once_and_read_1_rad_off(SafetyConfig())
    out = f.apply(START, glitch)
    np.testing.assert_array_equal(out.qpos, START)
    assert out.flags == Intervention.IMPLAUSIBLE_READING
    out = f.apply(START, START)  # the reading is back: nothing to set aside
    np.testing.assert_array_equal(out.qpos, START)
    assert out.flags == Intervention.NONE and f.counters.implausible_readings == 1


@pytest.mark.parametrize("glitch_ticks", [2, 3])
def test_a_policy_moving_through_a_glitch_keeps_its_pace_and_is_not_blamed(glitch_ticks: int) -> None:
    config = SafetyConfig(stop_after_rate_limited_ticks=3)
    f = SafetyFilter(config)
    commands = [f.apply(START, START).qpos]
    for tick in range(1, 12):
        target = START.copy()
        target[0] += 0.08 * tick  # a chunk at about half the slew limit
        reading = commands[-1].copy()  # an arm that follows its goals
        if 4 <= tick < 4 + glitch_ticks:
            reading[0] += 1.0
        commands.append(f.apply(target, reading).qpos)
    steps = np.diff([command[0] for command in commands])
    assert steps == pytest.approx([0.08] * 11) and not f.stopped


def test_jumps_read_before_a_restart_do_not_shorten_the_ticks_allowed_after_it() -> None:
    config = SafetyConfig()
    f, glitch = commanded_once_and_read_1_rad_off(config)
    for _ in range(config.implausible_reading_ticks - 1):
        f.apply(START, glitch)
    f.restart()  # a pause between runs, the arms not moved
    f.apply(START, START)
    for _ in range(config.implausible_reading_ticks):
        out = f.apply(START, glitch)
        assert out.flags == Intervention.IMPLAUSIBLE_READING and out.qpos[0] == START[0]


def test_a_reading_that_stays_where_it_jumped_latches_the_stop_and_nothing_moves() -> None:
    # No arm moves three steps in a tick: a reading that stays there is a fault (or a wrapped angle), and the rate
    # limit around it would command a jump of 0.85 rad towards it.
    config = SafetyConfig()
    f, stuck = commanded_once_and_read_1_rad_off(config)
    for _ in range(config.implausible_reading_ticks):
        out = f.apply(START, stuck)
        assert out.flags == Intervention.IMPLAUSIBLE_READING and out.qpos[0] == START[0] and not f.stopped
    for _ in range(3):
        out = f.apply(START + 0.1, stuck)  # the policy would move: the stop holds the last command
        assert Intervention.STOPPED in out.flags and np.array_equal(out.qpos, START)
    assert f.stop_reason.startswith("qpos[0] read 1.000 rad, 1.000 from its last plausible reading for 4 ticks")
    f.restart()  # a pause between runs: the reading is taken afresh (the rig may have moved the arm)
    f.clear_stop()
    out = f.apply(None, stuck)
    assert out.flags == Intervention.HELD and np.array_equal(out.qpos, stuck)  # held where it is measured
