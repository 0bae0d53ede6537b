"""`cosmos-edge client`: talk to a running policy server over ZeroMQ from the command line.

`ping` (round trip and clock offset), `metadata` (printed as JSON), `set-mode MODE` (for every controller), and
`act OBS.npz --task ...` (one chunk for an observation file, as `cosmos-edge act` reads them; for an ALOHA server,
camera frames of another size are resized to the wire's as the controller does, another platform's server takes them
at its own frame size). With CURVE, give the server's public certificate and this
client's secret one, as written by `cosmos-edge keys generate`.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_edge.cli.arg_types import int_in_range
from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.cli.npz_files import (
    add_frames_argument,
    add_observation_arguments,
    as_rendered,
    as_the_aloha_client_sends,
    observation_path,
    output_path,
    read_observation,
    write_npz,
)
from cosmos_edge.cli.output_paths import require_out
from cosmos_edge.robot_bridge.act_messages import sampled_chunks
from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient, RemoteError, RequestTimeout
from cosmos_edge.robot_bridge.curve import CurveKeyPair, load_public_key
from cosmos_edge.robot_bridge.endpoints import parse_endpoint
from cosmos_edge.robot_bridge.protocol import MessageError, ServerMetadata, check_instruction
from cosmos_edge.robot_bridge.wire import REQUEST_FAULTS, wire_proprio
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import IMAGE_SIZE, platform_spec
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED, Observation, check_camera_frame

_LOG = logging.getLogger(__name__)
_CONTROL_TIMEOUT_S = 5.0  # ping, metadata and set-mode are answered at once, also during an inference
_ACT_TIMEOUT_S = 120.0  # a chunk on CPU, or a planning chunk, takes seconds to minutes


def connection_arguments(timeout_help: str) -> argparse.ArgumentParser:
    """The options that reach a server (a parent parser): `--endpoint`, `--timeout` and the CURVE keys (`connect`)."""
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--endpoint", default=ServerConfig.endpoint, help="the server's ZeroMQ endpoint")
    connection.add_argument("--timeout", type=float, help=timeout_help)
    connection.add_argument("--curve-server-key", type=Path, help="the server's public '.key' certificate")
    connection.add_argument("--curve-secret-key", type=Path, help="this client's '.key_secret' certificate")
    return connection


def register(subparsers: argparse._SubParsersAction) -> None:
    connection = connection_arguments(
        f"seconds to wait for the reply (default {_CONTROL_TIMEOUT_S:g}; act {_ACT_TIMEOUT_S:g})"
    )

    parser = subparsers.add_parser("client", help="send one request to a running policy server (ZeroMQ)")
    actions = parser.add_subparsers(dest="action", required=True)
    actions.add_parser("ping", parents=[connection], help="round trip and clock offset").set_defaults(
        func=naming_connection_flags(_ping)
    )
    actions.add_parser("metadata", parents=[connection], help="platform, modes, instructions").set_defaults(
        func=naming_connection_flags(_metadata)
    )
    set_mode = actions.add_parser("set-mode", parents=[connection], help="switch the mode for every controller")
    set_mode.add_argument("mode", help="one of the server's modes, e.g. reactive or planning")
    set_mode.set_defaults(func=naming_connection_flags(_set_mode))
    act = actions.add_parser("act", parents=[connection], help="one action chunk for an observation .npz")
    observation_help = (
        f"npz: one uint8 HxWx3 array per camera, and `proprio`; for an ALOHA server, frames of another size than "
        f"{IMAGE_SIZE}x{IMAGE_SIZE} are resized as the ALOHA controller does (480x640 -> 256 -> 224, Pillow bicubic); "
        "a LIBERO or RoboCasa server takes frames of its --image-size only, which its policy resizes as `act` does"
    )
    add_observation_arguments(act, observation_help)
    act.add_argument("--task", required=True, help="the instruction, as the server lists it")
    add_frames_argument(act)
    act.add_argument("--mode", help="answer in this mode (default: the server's)")
    act.add_argument("--seed", type=int_in_range(0, MAX_SEED), help="default: the server's (195, as the official code)")
    act.add_argument(
        "--steps",
        type=int_in_range(1, MAX_DENOISING_STEPS),
        metavar="N",
        help=f"denoising steps, 1..{MAX_DENOISING_STEPS} (default: the server's: the platform's for reactive, "
        "its --num-denoising-steps-action for planning)",
    )
    act.add_argument(
        "--return-all-query-results",
        action="store_true",
        help="planning: also every candidate's actions and per-depth values (written to --out)",
    )
    act.add_argument(
        "--out",
        type=Path,
        help="npz to write: actions, value (planning: also planning_outcome, chosen_index, candidate_values; with "
        "--return-all-query-results also candidate_values_by_depth, candidate_actions, candidate_actions_by_depth)",
    )
    act.set_defaults(func=naming_connection_flags(_act))


def connect(args: argparse.Namespace, timeout_s: float) -> PolicyClient:
    """A client for `--endpoint`, with CURVE when both key options are given; a server that is down is said within
    the control timeout (or `--timeout`, if shorter), whatever the reply's."""
    if (args.curve_server_key is None) != (args.curve_secret_key is None):
        raise ConfigError("--curve-server-key and --curve-secret-key: give both or neither")
    curve: dict[str, Any] = {}
    if args.curve_server_key is not None:
        curve = {
            "server_public_key": load_public_key(args.curve_server_key),
            "client_keys": CurveKeyPair.load(args.curve_secret_key),
        }
    _check_reachable(args.endpoint)
    timeout = timeout_s if args.timeout is None else args.timeout
    return PolicyClient(args.endpoint, timeout_s=timeout, connect_timeout_s=_CONTROL_TIMEOUT_S, **curve)


def _check_reachable(endpoint: str) -> None:
    """What would otherwise only time out: an in-process endpoint, or a host name that does not resolve."""
    parsed = parse_endpoint(endpoint, wildcard_port=False)
    if parsed.scheme == "inproc":
        raise ConfigError(
            f"--endpoint {endpoint}: reaches only its own process; expected tcp://HOST:PORT or ipc://PATH"
        )
    if parsed.scheme != "tcp":
        return
    failures: list[BaseException] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(parsed.host, int(parsed.port), proto=socket.IPPROTO_TCP)
        except (OSError, UnicodeError) as error:
            failures.append(error)

    # A resolver that does not answer can take many seconds: past the wait, the connection attempt carries on.
    resolving = threading.Thread(target=resolve, name="resolve-endpoint", daemon=True)
    resolving.start()
    resolving.join(_RESOLVE_WAIT_S)
    if failures:
        raise ConfigError(f"--endpoint {endpoint}: cannot resolve {parsed.host!r} ({failures[0]})")


_RESOLVE_WAIT_S = 2.0  # how long a host name's resolution is waited for before connecting anyway

# The client's settings named in its errors, and the flags that give them.
_FLAGS = {
    "endpoint": "--endpoint",
    "timeout_s": "--timeout",
    "instruction": "--task",
    "mode": "--mode",
    "seed": "--seed",
    "steps": "--steps",
    "return_all_query_results": "--return-all-query-results",
    "return_actions_by_depth": "--return-all-query-results",
}


def naming_connection_flags(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`command` with the client's errors about its settings ("endpoint: ...", on creation or on the first connect;
    "timeout_s: ...") and the server's refusals of a field a flag gave ("instruction: ...") naming the flags."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            with naming_flags(_flags(args)):
                return command(args)
        except RemoteError as error:
            source = _refused_by(args, error.field)
            if source is None or error.code not in REQUEST_FAULTS:
                raise
            detail = error.detail.removeprefix(f"{error.field}: ")
            raise ConfigError(f"{source}: the server refused it ({error.code.value}): {detail}") from None
        except RequestTimeout as error:
            raise RequestTimeout(f"{error} (--timeout sets how long this command waits)") from None

    return run


def _flags(args: argparse.Namespace) -> dict[str, str]:
    """How the command names the settings it was given: by flag, and `set-mode`'s mode by its value (an argument)."""
    if getattr(args, "action", None) == "set-mode":  # a `client` subcommand; `robot` has none
        return {**_FLAGS, "mode": f"mode {args.mode!r}"}
    return _FLAGS


def _refused_by(args: argparse.Namespace, field: str) -> str | None:
    """What gave the request field the server refused: a flag, or (`client act`) the observation file, whose proprio
    and camera frames are the request's other fields; None for a field of neither."""
    flags = _flags(args)
    if field in flags:
        return flags[field]
    if field and getattr(args, "action", None) == "act":
        return f"observation: {observation_path(args)}: {field}"
    return None


def _ping(args: argparse.Namespace) -> int:
    with connect(args, _CONTROL_TIMEOUT_S) as client:
        sent_ns = time.time_ns()
        pong = client.ping()
        received_ns = time.time_ns()
    # The server's clock minus ours, assuming the reply took half the round trip.
    offset_ms = (pong.server_time_ns - (sent_ns + received_ns) / 2) / 1e6
    print(f"pong from {args.endpoint}: server {pong.server_version}, round trip {(received_ns - sent_ns) / 1e6:.2f} ms")
    print(f"server clock - ours: {offset_ms:+.2f} ms")
    return 0


def _metadata(args: argparse.Namespace) -> int:
    with connect(args, _CONTROL_TIMEOUT_S) as client:
        metadata = client.metadata()
    print(json.dumps(metadata.as_dict(), indent=2))
    return 0


def _set_mode(args: argparse.Namespace) -> int:
    with connect(args, _CONTROL_TIMEOUT_S) as client:
        changed = client.set_mode(args.mode)
    print(f"mode: {changed.mode} (was {changed.previous_mode})")
    return 0


def _act(args: argparse.Namespace) -> int:
    path = observation_path(args)
    observation = _checked_observation(path)
    out = None if args.out is None else output_path("--out", args.out)
    if args.return_all_query_results:  # the summary printed holds no candidate's actions
        require_out("--return-all-query-results", "every candidate's results are", out)
    check_instruction(args.task)  # a request this command cannot build is refused before it connects
    with connect(args, _ACT_TIMEOUT_S) as client:
        server = client.metadata()  # its cameras and frame size, checked before the act is sent
        if args.frames == "upright":
            observation = as_rendered(platform_spec(server.platform), observation)
        observation = _as_the_server_takes_it(path, observation, server)
        reply = client.act(
            observation,
            args.task,
            obs_id=0,
            capture_time_ns=time.time_ns(),
            mode=args.mode,
            seed=args.seed,
            steps=args.steps,
            return_all_query_results=args.return_all_query_results,
            return_actions_by_depth=args.return_all_query_results,
        )
    rows, columns = reply.actions.shape
    print(f"action chunk: {rows} x {columns} (float32, un-normalised), mode {reply.mode}")
    print(f"value:        {reply.value:.6f}")
    arrays = {"actions": reply.actions, "value": np.array(reply.value, dtype=np.float32)}
    if args.return_all_query_results and reply.planning is None:
        _LOG.warning(
            "--return-all-query-results: the server answered in %s mode, which has no candidates (ask with --mode "
            "planning)",
            reply.mode,
        )
    if reply.planning is not None and reply.candidate_values is not None:
        values = _values(reply.candidate_values)  # float64, as `act` writes them: what ranked the candidates
        shown = ", ".join("not scored" if np.isnan(value) else f"{value:.6f}" for value in values)
        print(f"planning:     {reply.planning}, chose {reply.chosen_index}; values {shown}")
        arrays |= {
            "planning_outcome": np.array(reply.planning),
            "chosen_index": np.array(reply.chosen_index),
            "candidate_values": values,
        }
        actions, actions_by_depth = sampled_chunks(reply)  # NaN where none was sampled, as `act` writes them
        if reply.candidate_values_by_depth is not None and actions is not None:
            arrays["candidate_values_by_depth"] = np.stack([_values(row) for row in reply.candidate_values_by_depth])
            arrays["candidate_actions"] = actions
        if actions_by_depth is not None:
            arrays["candidate_actions_by_depth"] = actions_by_depth
    print("server timings (ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in reply.timings_ms.items()))
    if out is not None:
        write_npz(out, arrays)
        print(f"wrote {out}")
    return 0


def _checked_observation(path: Path) -> Observation:
    """The observation file with proprio float32, as an `act` carries it. Whatever any server would refuse is refused
    here, before connecting, naming the file and the field."""
    observation = read_observation(path)
    try:
        proprio = wire_proprio(observation.proprio)
        images = {camera: check_camera_frame(camera, frame) for camera, frame in observation.images.items()}
    except (InputError, MessageError) as error:
        raise InputError(f"observation: {path}: {error}") from None
    if not images:
        raise InputError(f"observation: {path}: no camera images; expected one uint8 HxWx3 array per camera")
    return Observation(images=images, proprio=proprio)


def _as_the_server_takes_it(path: Path, observation: Observation, server: ServerMetadata) -> Observation:
    """An ALOHA server's frames of another size resized as the ALOHA controller (and the official client) resizes
    them; another platform's sent as they are, which must have the server's size: its policy resizes them as an
    in-process `act` does, which a client-side resize would not reproduce."""
    if sorted(observation.images) != sorted(server.cameras):  # named before any size, which is the server's cameras'
        raise InputError(
            f"observation: {path}: cameras {sorted(observation.images)}; this {server.platform} server takes "
            f"{sorted(server.cameras)}",
            field="images",
        )
    if server.platform != "aloha":
        try:
            _check_frame_sizes(observation.images, server)
        except InputError as error:
            raise InputError(f"observation: {path}: {error}") from None
        return observation
    return as_the_aloha_client_sends(observation)


def _check_frame_sizes(images: Mapping[str, np.ndarray], server: ServerMetadata) -> None:
    for camera, frame in images.items():
        if frame.shape[:2] != tuple(server.image_size):
            height, width = server.image_size
            raise InputError(
                f"{camera}: expected {height}x{width} frames, the size this {server.platform} server takes (its "
                f"--image-size), got {frame.shape[0]}x{frame.shape[1]}; serve with --image-size "
                f"{frame.shape[0]}x{frame.shape[1]}, or run the query in-process with `cosmos-edge act`",
                field=camera,
            )


def _values(values: Sequence[float | None]) -> np.ndarray:
    """The values as float64, NaN for those the server did not compute (a planning deadline)."""
    return np.array([np.nan if value is None else value for value in values], np.float64)
