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
import importlib
import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict
from types import FrameType

from cosmos_edge.cli.arg_types import int_in_range, positive_hertz, positive_seconds
from cosmos_edge.cli.client_cmd import connect, connection_arguments, naming_connection_flags
from cosmos_edge.robot_bridge.controller.blending import BlendConfig, BlendScheme, summarize_boundaries
from cosmos_edge.robot_bridge.controller.chunk_source import ActParams, ThreadedChunkSource
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig
from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
from cosmos_edge.robot_bridge.protocol import ServerMetadata
from cosmos_edge.robot_bridge.robots.aloha_real import ALOHA_DIMS, AlohaRealRobot, RealEnvLike
from cosmos_edge.robot_bridge.robots.camera_frames import AlohaWireCameras
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED

_REQUEST_TIMEOUT_S = 10.0  # a chunk later than this is of no use to a moving arm: the executor retries


def register(subparsers: argparse._SubParsersAction) -> None:
    timeout = f"seconds to wait for a chunk before asking again (default {_REQUEST_TIMEOUT_S:g})"
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
    parser.add_argument("--task", required=True, help="the instruction, as the server lists it")
    parser.add_argument("--mode", help="ask in this mode (default: the server's)")
    parser.add_argument(
        "--seed", type=int_in_range(0, MAX_SEED), help="default: the server's (195, as the official code)"
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1, MAX_DENOISING_STEPS),
        metavar="N",
        help=f"denoising steps, 1..{MAX_DENOISING_STEPS} (default: the platform's)",
    )
    parser.add_argument("--duration-s", type=positive_seconds, help="stop after this long (default: at Ctrl-C)")
    parser.add_argument(
        "--control-rate-hz", type=positive_hertz, default=25.0, help="commands per second (Cosmos Policy ALOHA: 25)"
    )
    parser.add_argument(
        "--blend",
        choices=[scheme.value for scheme in BlendScheme],
        default=BlendScheme.CROSSFADE.value,
        help="how chunks are joined at their boundaries (none: a hard switch, as the official client)",
    )
    parser.add_argument(
        "--keep-pose",
        action="store_true",
        help="start from where the arms are, without moving them to the start pose first",
    )
    parser.set_defaults(func=naming_connection_flags(_robot))


def _robot(args: argparse.Namespace) -> int:
    make_env = _env_factory(args.env)
    executor_config = ExecutorConfig(control_rate_hz=args.control_rate_hz, blend=BlendConfig(BlendScheme(args.blend)))
    params = ActParams(args.task, mode=args.mode, seed=args.seed, steps=args.steps)
    with connect(args, _REQUEST_TIMEOUT_S) as client:
        _check_server(client.metadata(), args)  # before the arms move: a server that could not drive them
        try:
            env = make_env(**args.env_kwargs)
        except Exception as error:  # the rig's code: said in one line, as every error of the command
            raise ConfigError(f"--env {args.env}: failed: {type(error).__name__}: {error}") from error
        robot = AlohaWireCameras(AlohaRealRobot.connect(env, move_to_start=not args.keep_pose))
        safety = SafetyFilter(SafetyConfig())
        with ThreadedChunkSource(client, params) as source:
            executor = ChunkExecutor(robot, source, safety, executor_config)
            with _stop_on_signals(executor):
                print(f"driving the arms from {args.endpoint} ({args.task!r}); Ctrl-C holds the pose and ends")
                # The run ends at the latched stop (a flag the signal handler sets without taking a lock).
                summary = executor.run(duration_s=args.duration_s, until=lambda: safety.stopped)
    late = f", {summary.missed_ticks} more skipped (late)" if summary.missed_ticks else ""
    print(f"ticks: {summary.ticks}{late}; held position on {summary.hold_ticks}")
    print("executor: " + ", ".join(f"{name}={value}" for name, value in asdict(executor.counters).items()))
    print("safety: " + ", ".join(f"{name}={value}" for name, value in asdict(safety.counters).items()))
    boundaries = summarize_boundaries(executor.boundaries())
    print(
        f"chunk boundaries: {boundaries.boundaries}; largest per-tick change, rad: hard switch max "
        f"{boundaries.raw_jump_max:.3f}, commanded max {boundaries.commanded_jump_max:.3f}"
    )
    return 0


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


@contextlib.contextmanager
def _stop_on_signals(executor: ChunkExecutor) -> Iterator[None]:
    """SIGINT and SIGTERM latch the executor's stop: the arms hold, and the run ends after the tick in progress."""

    def stop(signum: int, frame: FrameType | None) -> None:
        executor.stop(f"signal {signal.Signals(signum).name}")

    previous = {number: signal.signal(number, stop) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _env_factory(spec: str) -> Callable[..., RealEnvLike]:
    module_name, separator, function_name = spec.partition(":")
    if not separator or not module_name or not function_name:
        raise ConfigError(f"--env {spec}: expected MODULE:FUNCTION, e.g. aloha_scripts.real_env:make_real_env")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        detail = f"cannot import {module_name} ({error}); is the rig's code on PYTHONPATH?"
        raise ConfigError(f"--env {spec}: {detail}") from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ConfigError(f"--env {spec}: {module_name} has no function {function_name}")
    return factory  # type: ignore[no-any-return]


def _json_object(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value
