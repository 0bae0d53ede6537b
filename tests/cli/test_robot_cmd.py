"""`cosmos-edge robot`: a rig's RealEnv driven from a running server, ended by its duration or a signal."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.server import PolicyServer
from tests.helpers import fake_real_env
from tests.helpers.bridge_doubles import INSTRUCTION, StubPolicy, serving

ENV = "tests.helpers.fake_real_env:make_env"


def robot(endpoint: str, *extra: str) -> list[str]:
    return ["robot", "--env", ENV, "--endpoint", endpoint, "--task", INSTRUCTION, *extra]


def test_the_arms_follow_the_served_chunks_through_the_safety_filter(capsys: pytest.CaptureFixture[str]) -> None:
    policy = StubPolicy()
    fake_real_env.MADE.clear()
    with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--duration-s", "1", "--env-kwargs", '{"init_node": true}')) == 0
    (env,) = fake_real_env.MADE
    assert env.kwargs == {"init_node": True} and env.resets == [False]  # moved to the start pose first
    commands = np.array(env.commands)
    # One second at 25 Hz (a tick the loaded machine made late is skipped, not repeated).
    assert len(commands) <= 25 and commands.shape[1] == 14 and np.isfinite(commands).all()
    assert np.abs(np.diff(commands[:, :6], axis=0)).max() <= 0.15 + 1e-9  # the safety filter's slew limit
    query = policy.queries[0]
    assert {image.shape for image in query.observation.images.values()} == {(224, 224, 3)}  # the wire's size
    printed = capsys.readouterr().out
    run = re.search(r"ticks: (\d+)(?:, (\d+) more skipped \(late\))?;", printed)
    assert run is not None and int(run[1]) + int(run[2] or 0) == 25  # skipped ticks count towards the run
    assert int(run[1]) == len(commands) and "chunk boundaries:" in printed


def test_the_rigs_own_limits_bound_every_commanded_step() -> None:
    fake_real_env.MADE.clear()
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        # Seconds: the first chunk must arrive (through three 480x640 resizes) on a loaded machine before it ends.
        assert main(robot(endpoint, "--duration-s", "3", "--safety", '{"max_joint_step": 0.01}')) == 0
    (env,) = fake_real_env.MADE
    steps = np.abs(np.diff(np.array(env.commands)[:, :6], axis=0))
    assert steps.max() <= 0.01 + 1e-9 and steps.max() > 0.005  # the arms moved, within the rig's step


def test_the_control_loop_runs_at_the_niceness_asked_for() -> None:
    fake_real_env.MADE.clear()
    exit_code: list[int] = []
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        argv = robot(endpoint, "--duration-s", "0.3", "--nice", "7")
        # On a thread of its own: a raised niceness may not be lowered back (without CAP_SYS_NICE).
        thread = threading.Thread(target=lambda: exit_code.append(main(argv)))
        thread.start()
        thread.join()
    (env,) = fake_real_env.MADE
    assert exit_code == [0] and env.niceness and set(env.niceness) == {7}
    assert os.getpriority(os.PRIO_PROCESS, 0) != 7  # this thread's is its own


def test_a_second_signal_gets_out_of_a_rig_that_hangs(capsys: pytest.CaptureFixture[str]) -> None:
    fake_real_env.MADE.clear()
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--keep-pose", "--env-kwargs", '{"hang_after": 3}')) == 130
    assert "cosmos-edge: interrupted (robot)" in capsys.readouterr().err


def test_a_signal_holds_the_pose_and_ends_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    fake_real_env.MADE.clear()
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        # No duration: until the SIGINT the env sends on its 10th step (handled on this, the main, thread).
        assert main(robot(endpoint, "--keep-pose", "--env-kwargs", '{"signal_after": 10}')) == 0
    (env,) = fake_real_env.MADE
    assert env.resets == [True]  # --keep-pose: the state is read, the arms not moved
    assert len(env.commands) == 10  # the run ended at the latched stop, before another tick
    assert re.search(r"ticks: 10[;,]", capsys.readouterr().out)  # with its counters, not a traceback


def test_a_signal_before_the_first_chunk_ends_at_once_and_is_no_failure(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    fake_real_env.MADE.clear()
    policy = StubPolicy(delay_s=8.0)  # the first reply still being computed when the chunk source closes (5 s)
    with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        argv = robot(endpoint, "--keep-pose", "--timeout", "60", "--env-kwargs", '{"signal_after": 3}')
        assert main(argv) == 0  # the operator stopped it: no "no chunk arrived" failure
    assert "no chunk arrived" not in capsys.readouterr().err
    # The request in flight was cancelled with the client, so the chunk source's worker ended with the run.
    assert not [record for record in caplog.records if "worker still in a request" in record.getMessage()]


def test_a_rig_that_fails_to_start_is_one_line_and_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        failing = ["--task", INSTRUCTION, "--env-kwargs", '{"fail": "no ROS master"}']
        assert main(["robot", "--env", ENV, "--endpoint", endpoint, *failing]) == 1  # the rig, not the arguments
        assert f"--env {ENV}: failed: RuntimeError: no ROS master" in capsys.readouterr().err
        for broken, named in (
            (
                '{"nan_at_reset": true}',
                "start pose: qpos[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13] read not finite",
            ),
            ('{"no_images_at_reset": true}', "failed: aloha_real: observation['images'] expected camera name"),
        ):
            argv = ["robot", "--env", ENV, "--endpoint", endpoint, "--task", INSTRUCTION, "--env-kwargs", broken]
            assert main([*argv, "--keep-pose"]) == 1
            assert named in capsys.readouterr().err
        wrong_kwarg = ["--task", INSTRUCTION, "--env-kwargs", '{"unknown": 1}']
        assert main(["robot", "--env", f"{ENV}_strict", "--endpoint", endpoint, *wrong_kwarg]) == 2  # the arguments
        assert "unexpected keyword argument 'unknown'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--task", "fold the towel"], "--task 'fold the towel': the server has no embedding for it; it knows"),
        (["--task", INSTRUCTION, "--mode", "dreaming"], "--mode dreaming: the server serves ['reactive']"),
        (
            ["--task", INSTRUCTION, "--control-rate-hz", "50"],
            "--control-rate-hz 50: faster than the 25 Hz the server's policy was trained at (its chunks would move "
            "the arms 2x as fast)",
        ),
        (["--task", INSTRUCTION, "--safety", '{"speed": 1}'], "--safety: unknown fields ['speed']; expected some of"),
        (
            ["--task", INSTRUCTION, "--safety", '{"max_joint_step": 0}'],
            "--safety: safety.max_joint_step: expected",
        ),
        (
            ["--task", INSTRUCTION, "--safety", '{"joint_lower": [-1, -1], "joint_upper": [1, 1]}'],
            "--safety: expected limits of 6 joints per arm, got 2",
        ),
    ],
)
def test_a_server_that_cannot_drive_the_arms_is_refused_before_they_move(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_real_env.MADE.clear()
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(["robot", "--env", ENV, "--endpoint", endpoint, *argv]) == 2
    assert named in capsys.readouterr().err and not fake_real_env.MADE


def test_arms_that_rest_outside_the_limits_are_refused_before_any_command(capsys: pytest.CaptureFixture[str]) -> None:
    # The fake rig rests at zeros; a stricter shoulder limit above them would have the filter lift both arms.
    fake_real_env.MADE.clear()
    lower = '{"joint_lower": [-3.1, 0.5, -1.7, -3.1, -1.8, -3.1]}'
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--keep-pose", "--duration-s", "1", "--safety", lower)) == 2
    (env,) = fake_real_env.MADE
    assert not env.commands
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "left shoulder (qpos[1]) at 0.000 rad, limits [0.500, 1.257]" in error
    assert error.rstrip().endswith("; --safety sets the limits")


def test_a_stop_the_safety_filter_latches_ends_the_run_as_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    fake_real_env.MADE.clear()
    latch = '{"max_joint_step": 0.0001, "stop_after_rate_limited_ticks": 2}'  # every policy target is too fast
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--duration-s", "5", "--safety", latch)) == 1
    captured = capsys.readouterr()
    assert "ticks:" in captured.out  # the report of what ran
    assert (
        "cosmos-edge: error: safety: the stop latched (the policy's target was rate limited 2 ticks in a row)"
        in captured.err
    )


def test_a_bad_safety_setting_is_refused_before_the_server_is_asked(capsys: pytest.CaptureFixture[str]) -> None:
    # No server listens on port 9: the setting is refused at once, not after the connection's timeout.
    argv = ["--task", INSTRUCTION, "--safety", '{"max_joint_step": 2}', "--timeout", "30"]
    assert main(["robot", "--env", ENV, "--endpoint", "tcp://127.0.0.1:9", *argv]) == 2
    assert "--safety: safety.max_joint_step: expected" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--env", "nocolon"], "--env nocolon: expected MODULE:FUNCTION"),
        (["--env", "no_such_module_x:make"], "--env no_such_module_x:make: cannot import no_such_module_x"),
        (["--env", "tests.helpers.fake_real_env:nothing"], "has no function nothing"),
    ],
)
def test_a_bad_env_is_one_line_before_anything_moves(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["robot", *argv, "--task", INSTRUCTION, "--endpoint", "tcp://127.0.0.1:9"]) == 2
    assert named in capsys.readouterr().err


def test_a_rig_failing_mid_run_is_one_line_after_the_counters(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--env-kwargs", '{"fail_after": 5}')) == 1  # a failure, not a usage error
    captured = capsys.readouterr()
    assert "ticks: 4" in captured.out and "chunk boundaries:" in captured.out  # what ran is reported
    assert f"--env {ENV}: the rig failed mid-run: OSError: USB camera disconnected" in captured.err


def test_sigterm_while_the_arms_move_to_the_start_pose_interrupts(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--env-kwargs", '{"terminate_at_reset": true}')) == 130
    assert capsys.readouterr().err.strip() == "cosmos-edge: interrupted (robot)"


def test_no_chunk_at_all_is_a_failed_run(capsys: pytest.CaptureFixture[str]) -> None:
    policy = StubPolicy(delay_s=1.0)  # slower than the client's timeout: every request times out
    with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        assert main(robot(endpoint, "--duration-s", "1", "--timeout", "0.3")) == 1
    err = capsys.readouterr().err
    assert "error: no chunk arrived from --endpoint tcp://127.0.0.1:" in err and "--timeout sets how long" in err


def test_a_rig_whose_readings_turn_nan_is_said_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        main(robot(endpoint, "--keep-pose", "--duration-s", "1", "--env-kwargs", '{"nan_after": 3}'))
    assert "command(s) held the pose for a joint reading or action that was not finite" in capsys.readouterr().err


def test_a_rig_whose_reading_glitches_is_said_at_the_end(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        main(robot(endpoint, "--keep-pose", "--duration-s", "1", "--env-kwargs", '{"glitch_at": 3}'))
    err = capsys.readouterr().err
    assert "warning: 1 command(s) set aside an arm joint reading that jumped farther in a tick than the arm" in err


def test_an_env_function_that_returns_no_rig_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        argv = ["robot", "--env", "os:getcwd", "--endpoint", endpoint, "--task", INSTRUCTION, "--keep-pose"]
        assert main(argv) == 2
    error = capsys.readouterr().err
    assert (
        "--env os:getcwd: failed: expected it to return a RealEnv-like rig (with reset() and step()), got str" in error
    )


def test_a_module_that_fails_as_it_is_imported_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken_rig.py").write_text("import rospy_that_is_not_here\n")
    (tmp_path / "syntax_rig.py").write_text("def make_env(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # the rig's code on the path, as a user's PYTHONPATH puts it
    for module, named in (
        ("broken_rig", "broken_rig imports rospy_that_is_not_here, which this Python cannot find"),
        ("syntax_rig", "importing syntax_rig failed: SyntaxError"),
    ):
        assert main(["robot", "--env", f"{module}:make_env", "--task", INSTRUCTION]) == 2
        assert named in capsys.readouterr().err


def test_the_rig_module_is_found_in_the_folder_the_command_runs_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As `python -m` finds it, not only on PYTHONPATH: the README's module:function run from the rig repository.
    (tmp_path / "folder_rig.py").write_text("def make_env():\n    return 'not a rig'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [path for path in sys.path if path not in ("", str(tmp_path))])
    with serving(PolicyServer(StubPolicy(), ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        argv = ["robot", "--env", "folder_rig:make_env", "--endpoint", endpoint, "--task", INSTRUCTION, "--keep-pose"]
        assert main(argv) == 2
    assert "--env folder_rig:make_env: failed: expected it to return a RealEnv-like rig" in capsys.readouterr().err
