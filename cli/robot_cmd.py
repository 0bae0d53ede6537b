"""`cosmos-edge robot`: drive a real ALOHA from a running policy server.

The rig's own code makes its `RealEnv` (ROS and Interbotix stay out of cosmos-edge): `--env MODULE:FUNCTION` names a
function that returns it, imported from the rig's Python path, and `--env-kwargs` its keyword arguments as a JSON
object (tonyzhaozh/aloha: `aloha_scripts.real_env:make_real_env` with `{"init_node": true}`). The chunk executor then
commands the arms every tick through the safety filter, from chunks it asks the server for ahead of time and blends
at their boundaries (`robot_bridge/controller/`).

SIGINT (Ctrl-C) or SIGTERM latches the executor's stop: the arms hold the last commanded pose, no chunk is asked for,
and the command ends after that tick with its counters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import sys
import threading
from collections.abc import Callable

import numpy as np

from cosmos_edge.cli.arg_types import factor_of_at_least_one, int_in_range, positive_hertz, positive_seconds
from cosmos_edge.cli.client_cmd import connect, connection_arguments, naming_connection_flags
from cosmos_edge.cli.run_report import print_run_report
from cosmos_edge.cli.signals import on_stop_signals
from cosmos_edge.robot_bridge.controller.blending import BlendConfig, BlendScheme
from cosmos_edge.robot_bridge.controller.chunk_source import ActParams, ThreadedChunkSource
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.robot_bridge.protocol import ServerMetadata
from cosmos_edge.robot_bridge.robots.aloha_real import ALOHA_DIMS, AlohaRealRobot, RealEnvLike
from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_observation
from cosmos_edge.runtime.errors import ConfigError, CosmosEdgeError, EngineError, InputError
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED

_REQUEST_TIMEOUT_S = 10.0  # a chunk later than this is of no use to a moving arm: the executor retries


def register(subparsers: argparse._SubParsersAction) -> None:
    timeout = (
        f"seconds to wait for the server at start, and for a chunk before asking again (default {_REQUEST_TIMEOUT_S:g})"
    )
    connection = connection_arguments(timeout)
    parser = subparsers.add_parser(
        "robot", parents=[connection], help="drive a real ALOHA from a running policy server (Ctrl-C holds and ends)"
    )
    parser.add_argument(
        "--env",
        required=True,
        metavar="MODULE:FUNCTION",
        help="the rig's function that returns its RealEnv, e.g. aloha_scripts.real_env:make_real_env",
    )
    parser.add_argument(
        "--env-kwargs",
        type=_json_object,
        default={},
        metavar="JSON",
        help='its keyword arguments, e.g. {"init_node": true}',
    )
    parser.add_argument(
        "--safety",
        type=_json_object,
        default={},
        metavar="JSON",
        help="the rig's limits, any of the safety filter's fields: joint_lower and joint_upper (rad, 6 values each, "
        "one per arm joint, applied to both arms), right_joint_lower and right_joint_upper (the right arm's own 6, "
        "when they differ), "
        "gripper_range (normalised), max_joint_step (rad per tick, at most 0.5), stop_after_rate_limited_ticks "
        "(latch a stop after that many ticks in a row of a policy target faster than max_joint_step; default: "
        "never), implausible_reading_ticks (ticks a joint reading more than three steps off may be set aside as a "
        "glitch before the stop latches; default 3, 0: every reading taken as it is); default vx300s limits and "
        '0.15, e.g. {"max_joint_step": 0.1, "stop_after_rate_limited_ticks": 5}',
    )
    parser.add_argument("--task", required=True, help="the instruction, as the server lists it")
    parser.add_argument("--mode", help="ask in this mode (default: the server's)")
    parser.add_argument(
        "--seed", type=int_in_range(0, MAX_SEED), help="default: the server's (195, as the official code)"
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1, MAX_DENOISING_STEPS),
        metavar="N",
        help=f"denoising steps, 1..{MAX_DENOISING_STEPS} (default: the server's: the platform's for reactive, "
        "its --num-denoising-steps-action for planning)",
    )
    parser.add_argument("--duration-s", type=positive_seconds, help="stop after this long (default: at Ctrl-C)")
    parser.add_argument(
        "--control-rate-hz",
        type=positive_hertz,
        help="commands per second (default: the server's, the rate its policy was trained at: 25 for ALOHA); a "
        "faster one is refused (the arms would move faster than trained), a slower one slows them down",
    )
    parser.add_argument(
        "--blend",
        choices=[scheme.value for scheme in BlendScheme],
        default=BlendScheme.CROSSFADE.value,
        help="how chunks are joined at their boundaries (none: a hard switch, as the official client)",
    )
    parser.add_argument(
        "--latency-margin",
        type=factor_of_at_least_one,
        default=ExecutorConfig.latency_margin,
        metavar="FACTOR",
        help="the next chunk is asked for when the actions left last the measured round trip times this (default "
        f"{ExecutorConfig.latency_margin:g}); raise it when the log says the robot starves on a jittery network",
    )
    parser.add_argument(
        "--nice",
        type=int_in_range(-20, 19),
        metavar="N",
        help="niceness of the control loop's thread while it runs: a negative one (root or CAP_SYS_NICE) keeps ticks "
        "on time when the policy or other work competes for the same cores (default: unchanged)",
    )
    parser.add_argument(
        "--realtime-priority",
        type=int_in_range(1, 99),
        metavar="N",
        help="run the control loop's thread under SCHED_FIFO at this priority (Linux; root, CAP_SYS_NICE or an "
        "RLIMIT_RTPRIO); if refused, a warning, and --nice applies (default: the normal scheduler)",
    )
    parser.add_argument(
        "--keep-pose",
        action="store_true",
        help="start from where the arms are, without moving them to the start pose first",
    )
    parser.set_defaults(func=naming_connection_flags(_robot))


def _robot(args: argparse.Namespace) -> int:
    make_env = _env_factory(args.env)
    params = ActParams(args.task, mode=args.mode, seed=args.seed, steps=args.steps)
    safety = SafetyFilter(_safety_config(args.safety))  # before the server is asked anything, and the arms move
    limits = safety.config
    with connect(args, _REQUEST_TIMEOUT_S) as client:
        metadata = client.metadata()
        _check_server(metadata, args)  # before the arms move: a server that could not drive them
        executor_config = ExecutorConfig(
            control_rate_hz=_control_rate_hz(args.control_rate_hz, metadata.control_rate_hz),
            blend=BlendConfig(BlendScheme(args.blend)),
            latency_margin=args.latency_margin,
            realtime_priority=args.realtime_priority,
            nice=args.nice,
        )
        print(
            f"safety: at most {limits.max_joint_step:g} rad per tick per arm joint, joints within "
            + ", ".join(f"{arm} {_rounded(*limits.arm_limits(index))}" for index, arm in enumerate(("left", "right")))
            + f" rad, grippers within {limits.gripper_range}"
        )
        robot = _connect_robot(make_env, args)
        start = robot.current_qpos()
        try:  # before the first command: the filter would move the arms back at its full rate
            safety.check_start_pose(start)
        except InputError as error:
            if not np.isfinite(start).all():  # the rig's reading, not the limits: nothing was commanded
                raise EngineError(f"--env {args.env}: {error}") from None
            raise ConfigError(f"{error}; --safety sets the limits") from None
        with ThreadedChunkSource(client, params, prepare=aloha_wire_observation) as source:
            executor = ChunkExecutor(robot, source, safety, executor_config)
            # SIGINT and SIGTERM latch the executor's stop: the arms hold, and the run ends after the tick in progress.
            signalled = threading.Event()

            def stop(signals: int) -> None:  # the first: a second one interrupts
                if not signalled.is_set():  # said once: a rig whose step hangs would otherwise seem deaf to it
                    with contextlib.suppress(OSError):  # straight to the descriptor: a handler must not print
                        os.write(2, b"stopping: holding the pose (Ctrl-C again quits at once)\n")
                signalled.set()
                executor.stop("a stop signal")

            with on_stop_signals(stop, second_interrupts=True):
                print(
                    f"driving the arms from {args.endpoint} ({args.task!r}); Ctrl-C holds the pose and ends (a second "
                    "Ctrl-C quits at once, should the rig hang)"
                )
                try:
                    # The run ends at the latched stop (a flag the signal handler sets without taking a lock).
                    executor.run(duration_s=args.duration_s, until=lambda: safety.stopped)
                except Exception as error:  # the rig (a camera, a servo) failed mid-run
                    raise EngineError(
                        f"--env {args.env}: the rig failed mid-run: {type(error).__name__}: {error}; the arms keep "
                        "their last commanded pose"
                    ) from error
                finally:  # what ran is reported, however the run ended
                    source.stop_requests()  # a request the last tick submitted is not sent after the next line
                    client.close()  # a request in flight is cancelled now, not at its timeout: the run is over
                    print_run_report(executor, safety, executor.summary())
    return _verdict(args, executor, safety, signalled=signalled.is_set())


def _verdict(args: argparse.Namespace, executor: ChunkExecutor, safety: SafetyFilter, *, signalled: bool) -> int:
    """The exit status of a run, with a line for what the counters alone would hide."""
    counters = safety.counters
    if counters.non_finite:  # a rig reporting NaN holds the arms
        print(
            f"cosmos-edge: warning: {counters.non_finite} command(s) held the pose for a joint reading or action that "
            "was not finite (check the rig's qpos)",
            file=sys.stderr,
        )
    if counters.implausible_readings:  # a glitching encoder or bus
        print(
            f"cosmos-edge: warning: {counters.implausible_readings} command(s) set aside an arm joint reading that "
            "jumped farther in a tick than the arm moves (check the rig's encoders and cabling)",
            file=sys.stderr,
        )
    if executor.counters.chunks_adopted == 0 and not signalled:  # the policy never drove the arms
        failed = executor.counters.request_failures
        why = (
            f"{failed} request(s) failed (the log names their errors; --timeout sets how long one may take)"
            if failed
            else "none was answered before the run ended (--duration-s)"
        )
        print(f"cosmos-edge: error: no chunk arrived from --endpoint {args.endpoint}: {why}", file=sys.stderr)
        return 1
    if safety.stopped and not signalled:  # the filter latched it (--safety stop_after_rate_limited_ticks)
        print(
            f"cosmos-edge: error: safety: the stop latched ({safety.stop_reason}); the arms hold their last commanded "
            "pose",
            file=sys.stderr,
        )
        return 1
    return 0


def _connect_robot(make_env: Callable[..., RealEnvLike], args: argparse.Namespace) -> AlohaRealRobot:
    """The rig's env, moved to the start pose (unless --keep-pose); its failures are one line naming --env."""
    made = False
    try:
        env = make_env(**args.env_kwargs)
        made = True
        if not all(callable(getattr(env, method, None)) for method in ("reset", "step")):
            raise ConfigError(  # the wrong function named: a usage error, before any rig code runs further
                f"expected it to return a RealEnv-like rig (with reset() and step()), got {type(env).__name__}"
            )
        if not args.keep_pose:
            print("moving the arms to the start pose")
        return AlohaRealRobot.connect(env, move_to_start=not args.keep_pose)
    except Exception as error:  # the rig's code, or its qpos refused: said in one line naming --env
        detail = error if isinstance(error, CosmosEdgeError) else f"{type(error).__name__}: {error}"
        # Arguments the function refused (--env-kwargs) are a usage error; the rig failing once made (no ROS master,
        # a camera, a qpos or frame of the wrong shape), as mid-run, is not.
        usage = isinstance(error, ConfigError) or (isinstance(error, TypeError) and not made)
        raise (ConfigError if usage else EngineError)(f"--env {args.env}: failed: {detail}") from error


def _check_server(metadata: ServerMetadata, args: argparse.Namespace) -> None:
    if (metadata.platform, metadata.action_dim) != ("aloha", ALOHA_DIMS):
        raise ConfigError(
            f"--endpoint {args.endpoint}: serves {metadata.platform} ({metadata.action_dim} actions), not aloha"
        )
    if args.task not in metadata.instructions:
        known = ", ".join(repr(instruction) for instruction in metadata.instructions)
        raise ConfigError(f"--task {args.task!r}: the server has no embedding for it; it knows {known}")
    if args.mode is not None and args.mode not in metadata.modes:
        raise ConfigError(f"--mode {args.mode}: the server serves {list(metadata.modes)}")


def _control_rate_hz(requested: float | None, trained: float) -> float:
    """The command rate: the server's policy's own unless asked; a chunk played faster moves the arms faster than
    the policy was trained to (and lets the safety filter's per-tick limit through faster)."""
    if requested is None:
        return trained
    if requested > trained:
        raise ConfigError(
            f"--control-rate-hz {requested:g}: faster than the {trained:g} Hz the server's policy was trained at (its "
            f"chunks would move the arms {requested / trained:.2g}x as fast); omit the flag or give at most {trained:g}"
        )
    if requested < trained:
        print(f"playing the chunks at {requested:g} Hz, slower than the policy's {trained:g} Hz: the arms move slower")
    return requested


def _env_factory(spec: str) -> Callable[..., RealEnvLike]:
    module_name, separator, function_name = spec.partition(":")
    if not separator or not module_name or not function_name:
        raise ConfigError(f"--env {spec}: expected MODULE:FUNCTION, e.g. aloha_scripts.real_env:make_real_env")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the rig's code is found from where the command runs,
        sys.path.insert(0, os.getcwd())  # as with `python -m`
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):  # the module, or a parent
            detail = (
                f"cannot import {module_name} ({error}); run from the folder that holds it, or put the rig's code "
                "on PYTHONPATH"
            )
        else:  # found, but something it imports is not installed here (ROS, Interbotix, ...)
            detail = f"{module_name} imports {error.name}, which this Python cannot find (the rig's environment?)"
        raise ConfigError(f"--env {spec}: {detail}") from None
    except Exception as error:  # the module itself fails as it is imported (a syntax error, a missing ROS master)
        raise ConfigError(f"--env {spec}: importing {module_name} failed: {type(error).__name__}: {error}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ConfigError(f"--env {spec}: {module_name} has no function {function_name}")
    return factory  # type: ignore[no-any-return]


def _rounded(lower: tuple[float, ...], upper: tuple[float, ...]) -> str:
    return f"{[round(lo, 3) for lo in lower]}..{[round(hi, 3) for hi in upper]}"


def _safety_config(fields: dict[str, object]) -> SafetyConfig:
    """The --safety limits over the defaults; one line naming the flag and the field when they are wrong."""
    known = [field.name for field in dataclasses.fields(SafetyConfig)]
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"--safety: unknown fields {unknown}; expected some of {known}")
    try:
        values = {name: tuple(value) if isinstance(value, list) else value for name, value in fields.items()}
        config = SafetyConfig(**values)  # type: ignore[arg-type]
    except ConfigError as error:
        raise ConfigError(f"--safety: {error}") from None
    if config.dims != ALOHA_DIMS:
        raise ConfigError(
            f"--safety: expected limits of {ALOHA_DIMS // 2 - 1} joints per arm, got {config.dims // 2 - 1}"
        )
    return config


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
