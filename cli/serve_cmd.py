"""`cosmos-edge serve`: the server's network and safety options, and running it until SIGINT/SIGTERM.

How the policies are built (bundle, backend, checkpoint) is the caller's part: `add_serve_parser` takes a factory
that turns the parsed arguments into one `Policy` per mode, and the caller adds its own arguments to the parser it
returns.

`--http HOST:PORT` adds the official Cosmos Policy ALOHA HTTP endpoint beside the ZeroMQ one (`--endpoint none`:
instead of it); both feed the same queue and inference thread.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, NoReturn

from cosmos_edge.cli.arg_types import image_size, mebibytes, positive_seconds
from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.cli.model_source import add_model_arguments, model_files, model_source
from cosmos_edge.cli.planning_args import (
    add_planning_arguments,
    log_candidates,
    planning_flags_given,
    resolve_planning,
)
from cosmos_edge.cli.signals import on_stop_signals
from cosmos_edge.robot_bridge.binding import BoundRouter, ServerConfig, check_limits_hold_an_act
from cosmos_edge.robot_bridge.curve import CurveKeyPair, ServerCurve, load_public_keys
from cosmos_edge.robot_bridge.official_act import CandidateImageLists, check_official_cameras
from cosmos_edge.robot_bridge.protocol import WireLimits
from cosmos_edge.robot_bridge.server import PolicyServer
from cosmos_edge.runtime.bundle.loader import (
    LoadedPolicies,
    compiles_dit,
    load_policies,
    source_platform,
)
from cosmos_edge.runtime.bundle.sources import ModelSource
from cosmos_edge.runtime.errors import ConfigError, EngineError, NonFiniteOutput
from cosmos_edge.runtime.platforms import IMAGE_SIZE
from cosmos_edge.runtime.policy.planning_config import PlanningConfig

if TYPE_CHECKING:
    from cosmos_edge.robot_bridge.http_server import HttpConfig, HttpEndpoint

PolicyFactory = Callable[[argparse.Namespace], LoadedPolicies]

_LOG = logging.getLogger(__name__)
_MIB = 2**20
_NO_ZEROMQ = "none"
# With `--endpoint none` the server's queue and worker still run (the HTTP endpoint uses them), and its ROUTER socket
# binds this in-process address, which nothing outside the process can reach.
_IN_PROCESS_ONLY = "inproc://cosmos-edge-no-zeromq-endpoint"
_MODES = ("reactive", "planning")  # what `LoadedPolicies.modes()` can serve; checked before any model loads

_DEFAULT_MAX_ARRAY_MB = 4.0


def add_serve_parser(subparsers: argparse._SubParsersAction, make_policies: PolicyFactory) -> argparse.ArgumentParser:
    """Adds `serve`, whose policies `make_policies` builds from the parsed arguments."""
    parser = subparsers.add_parser("serve", help="serve a policy to robot controllers over ZeroMQ (and HTTP)")
    parser.add_argument(
        "--endpoint", default=ServerConfig.endpoint, help="ZeroMQ bind address; 'none' serves HTTP only (--http)"
    )
    parser.add_argument(
        "--default-mode", default="reactive", choices=_MODES, help="mode used when a request names none"
    )
    parser.add_argument("--max-pending", type=int, default=8, help="controllers that may wait for inference at once")
    parser.add_argument(
        "--image-size",
        type=image_size,
        metavar="HxW",
        help=f"the size of the camera frames requests carry (default {IMAGE_SIZE}x{IMAGE_SIZE}, the official ALOHA "
        "client's and the only size an ALOHA server takes); a LIBERO or RoboCasa server may take its cameras' own "
        "size (LIBERO's 256x256 renders), which its policy then resizes exactly as an in-process `act` does",
    )
    parser.add_argument(
        "--max-message-mb",
        type=mebibytes,
        default=16.0,
        help="largest request accepted (an HTTP /act body: 1.4 times that, for its base64 arrays)",
    )
    parser.add_argument(
        "--max-array-mb",
        type=mebibytes,
        default=_DEFAULT_MAX_ARRAY_MB,
        help="largest single image or vector accepted",
    )
    parser.add_argument("--curve-secret-key", help="the server's '.key_secret' certificate; enables CURVE")
    parser.add_argument("--curve-clients", help="directory of the '.key' certificates of admitted clients")
    parser.add_argument(
        "--insecure-bind-all",
        action="store_true",
        help="allow a non-loopback endpoint without CURVE: anyone who reaches the port can command the robot",
    )
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="also serve the official Cosmos Policy ALOHA HTTP endpoint (POST /act; its clients use port 8777)",
    )
    parser.add_argument(
        "--http-insecure-bind-all",
        action="store_true",
        help="allow a non-loopback --http address: HTTP has no authentication, whoever reaches it commands the robot",
    )
    parser.add_argument(
        "--http-read-timeout-s",
        type=positive_seconds,
        default=30.0,
        help="the time an HTTP connection has to send a whole request, from its opening or its last reply, before it "
        "is closed (default: %(default)s s; the official client's request is 0.6 MB, 5.4 MB with --use_history: "
        "raise it for slower links)",
    )
    parser.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=5.0,
        help="after SIGINT/SIGTERM, how long the chunk being inferred may take to reach its controller before it is "
        "answered shutting_down and the server exits (a second signal ends it at once)",
    )

    def serve(args: argparse.Namespace) -> int:
        with naming_flags(_FLAGS), contextlib.ExitStack() as sockets:
            config, http = server_config(args), http_config(args)
            # Bound before the policies load (minutes, for the 2B model): a port in use is refused at once.
            router = sockets.enter_context(BoundRouter.bind(config))
            listener = sockets.enter_context(_http_listener(http))
            with contextlib.ExitStack() as policies:
                loaded = policies.enter_context(make_policies(args))
                server = PolicyServer(loaded.modes(), config, router=router)
                planning = loaded.planning.config if loaded.planning is not None else None
                code = run_server(server, http, listener, official_image_lists(planning))
                if not server.policy_running:
                    return code
                policies.pop_all()  # a call outlived the shutdown window and still uses them: the exit releases them
        _exit_now(code)

    parser.set_defaults(func=serve)
    return parser


def server_config(args: argparse.Namespace) -> ServerConfig:
    curve = None
    if args.curve_secret_key or args.curve_clients:
        if not (args.curve_secret_key and args.curve_clients):
            raise ConfigError("--curve-secret-key and --curve-clients: give both or neither")
        curve = ServerCurve(CurveKeyPair.load(args.curve_secret_key), load_public_keys(args.curve_clients))
    endpoint = args.endpoint
    if endpoint == _NO_ZEROMQ or endpoint.startswith("inproc://"):
        if args.http is None:  # an inproc:// endpoint is reachable from this process only
            raise ConfigError(f"--endpoint {endpoint}: needs --http, or nothing could reach the policies")
        endpoint = endpoint if endpoint != _NO_ZEROMQ else _IN_PROCESS_ONLY
    return ServerConfig(
        endpoint=endpoint,
        limits=wire_limits(args),
        image_size=args.image_size or (IMAGE_SIZE, IMAGE_SIZE),
        default_mode=args.default_mode,
        max_pending=args.max_pending,
        curve=curve,
        insecure_bind_all=args.insecure_bind_all,
        shutdown_timeout_s=args.shutdown_timeout_s,
    )


def wire_limits(args: argparse.Namespace) -> WireLimits:
    if args.max_array_mb > args.max_message_mb:
        default = " (its default)" if args.max_array_mb == _DEFAULT_MAX_ARRAY_MB else ""
        raise ConfigError(
            f"--max-array-mb {args.max_array_mb:g}{default}: expected at most --max-message-mb "
            f"({args.max_message_mb:g}); lower it too"
        )
    message_bytes = max(1, round(args.max_message_mb * _MIB))
    return WireLimits(
        max_message_bytes=message_bytes,
        max_array_bytes=max(1, round(args.max_array_mb * _MIB)),
        max_header_bytes=min(WireLimits.max_header_bytes, message_bytes),  # no flag of its own: within the message's
    )


# The official /act body carries its arrays base64 in JSON: 4/3 of their bytes, plus keys and quotes. A body
# holding what a ZeroMQ message of --max-message-mb holds is allowed that much more.
_BASE64_GROWTH = 1.4


def http_config(args: argparse.Namespace) -> HttpConfig | None:
    """The HTTP endpoint's settings for `--http`, or None without it."""
    if args.http is None:
        return None
    try:  # imported only here: starlette and uvicorn are the optional `http` extra
        from cosmos_edge.robot_bridge.http_server import HttpConfig, parse_address
    except ImportError as error:
        raise EngineError(f"--http: needs the http extra, pip install 'cosmos-edge[http]' ({error})") from None
    host, port = parse_address(args.http)
    return HttpConfig(
        host,
        port,
        insecure_bind_all=args.http_insecure_bind_all,
        max_body_bytes=max(1, round(args.max_message_mb * _MIB * _BASE64_GROWTH)),
        shutdown_timeout_s=args.shutdown_timeout_s,
        request_read_timeout_s=args.http_read_timeout_s,
    )


def run_server(
    server: PolicyServer,
    http: HttpConfig | None = None,
    http_listener: socket.socket | None = None,
    image_lists: Mapping[str, CandidateImageLists] | None = None,
) -> int:
    """Serves until SIGINT or SIGTERM, then shuts down cleanly: every request taken in is answered before the sockets
    close (`PolicyServer.serve_forever`). Must run in the main thread (signal handlers); once a signal stopped it,
    later ones are absorbed for the rest of the process, a third one ending it at once (`on_stop_signals`). With
    `http`, the HTTP endpoint (on `http_listener` when it is bound already) serves the same policies through the same
    queue, its replies' future-image lists laid out per mode by `image_lists`."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("run_server installs signal handlers, which only the main thread can do")

    endpoint = _http_endpoint(server, http, http_listener, image_lists)

    def stop(signals: int) -> None:
        # Both endpoints wind down at once, so the shutdown window is spent once: the HTTP endpoint stops accepting
        # and finishes its requests in flight while the server answers those it queued (then refuses with 503). A
        # second signal ends the window: the request being computed is answered `shutting_down` now.
        server.stop(now=signals > 1)
        if endpoint is not None:
            endpoint.request_stop(now=signals > 1)

    with on_stop_signals(stop, absorb_after_stop=True), server, endpoint or contextlib.nullcontext():
        server.serve_forever()
    return 0


def _exit_now(code: int) -> NoReturn:
    """Ends the process without waiting for the policy call still running. Every request is answered and the sockets
    are closed by now, but a normal exit would wait for the call: the interpreter joins thread pool threads at exit
    (the planning policy computes its candidates on some), however long they take."""
    _LOG.info("exiting without waiting for the policy call still running")
    logging.shutdown()  # flushes the log handlers, which os._exit would not
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _http_endpoint(
    server: PolicyServer,
    http: HttpConfig | None,
    listener: socket.socket | None,
    image_lists: Mapping[str, CandidateImageLists] | None,
) -> HttpEndpoint | None:
    if http is None:
        return None
    from cosmos_edge.robot_bridge.http_server import HttpEndpoint  # the optional extra, as in `http_config`

    return HttpEndpoint(server, http, listener=listener, image_lists=image_lists)


def official_image_lists(planning: PlanningConfig | None) -> dict[str, CandidateImageLists]:
    """How the official `/act` reply pairs each mode's candidates with future images: the reactive mode is the
    official base config (its action pass's images, no world model); the `planning` mode's follow its options."""
    lists = {"reactive": CandidateImageLists()}
    if planning is not None:
        lists["planning"] = CandidateImageLists(per_depth=planning.ar_future_prediction)
    return lists


def _http_listener(http: HttpConfig | None) -> contextlib.AbstractContextManager[socket.socket | None]:
    if http is None:
        return contextlib.nullcontext()
    from cosmos_edge.robot_bridge.http_server import bind  # the optional extra, as in `http_config`

    return contextlib.closing(bind(http))


# The settings' names in the library's errors, and the flags that give them.
_FLAGS = {
    "endpoint": "--endpoint",
    "max_pending": "--max-pending",
    "shutdown_timeout_s": "--shutdown-timeout-s",
    "request_read_timeout_s": "--http-read-timeout-s",
    "default_mode": "--default-mode",
    "http address": "--http",
    "http": "--http",
    "device": "--devices",  # a bundle's, checked by its backend as it loads
    "max_message_bytes": "--max-message-mb",
    "max_array_bytes": "--max-array-mb",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """`serve` with `reactive` and `planning` modes, from a bundle (no torch) or from official checkpoint files."""
    parser = add_serve_parser(subparsers, served_policies)
    add_model_arguments(parser)
    parser.add_argument(
        "--devices",
        help="comma-separated devices; planning spreads candidates over them (default: the official files on cuda "
        "when torch sees one, else cpu; a bundle on cpu, or cuda for tensorrt)",
    )
    add_planning_arguments(parser)


def served_policies(args: argparse.Namespace) -> LoadedPolicies:
    """Both modes from one load: the reactive policy and the planner share each device's networks."""
    devices = _device_list(args) or None
    source = model_source(args, devices or [], device_flag="--devices")
    planning, reactive_only = resolve_planning(args, source, devices)
    _check_before_loading(args, source, reactive_only)
    if planning is not None:
        log_candidates(args, planning)
    loaded = load_policies(
        source,
        devices=devices,
        planning=planning,
        planning_deadline_ms=args.planning_deadline_ms,
        future_images=False,  # served replies carry no images: a bundle's decoder graphs stay unloaded
        use_variance_scale=args.use_variance_scale,
    )
    if reactive_only is not None:  # said once the devices are known to work: a bad one is the error to see first
        _LOG.warning("serving the reactive mode only: %s", reactive_only)
    if args.use_variance_scale:
        _LOG.info("sampling with the official use_variance_scale: each seed scales its passes' sigma range")
    if loaded.planning is not None:
        deadline = loaded.planning.deadline_ms
        _LOG.info(
            "planning over %d device(s), %s, %s",
            len(loaded.device_networks),
            "independent passes batched" if loaded.planning.batch_passes else "pass after pass (CPU)",
            f"deadline {deadline:.0f} ms" if deadline is not None else "no deadline",
        )
    try:
        _LOG.info("warming up (kernels%s) before serving", ", compilation" if compiles_dit(source) else "")
        _LOG.info("warm-up done in %.1f s; serving", loaded.warm_up())
    except NonFiniteOutput as error:  # the weights' fault, found by the warm-up query: named as `act` names them
        loaded.close()
        raise NonFiniteOutput(f"warm-up: {error}; the model: {model_files(source)}") from None
    except BaseException:
        loaded.close()
        raise
    return loaded


def _check_before_loading(args: argparse.Namespace, source: ModelSource, reactive_only: str | None) -> None:
    """What depends on the model but can be known from its files: refused before it loads (minutes for 2B).
    `reactive_only`: why the model serves no planning, if it serves none."""
    if reactive_only is not None:
        if args.default_mode == "planning":
            raise ConfigError(f"--default-mode planning: {reactive_only}")
        if given := planning_flags_given(args):
            raise ConfigError(f"{given[0]}: a planning option, but {reactive_only}")
    platform = source_platform(source)
    size = args.image_size or (IMAGE_SIZE, IMAGE_SIZE)
    if platform.name == "aloha" and size != (IMAGE_SIZE, IMAGE_SIZE):
        raise ConfigError(
            f"--image-size {size[0]}x{size[1]}: an ALOHA server takes {IMAGE_SIZE}x{IMAGE_SIZE} frames, as the "
            "official client resizes them (its controllers resize theirs the same way)"
        )
    with naming_flags(_FLAGS):
        check_limits_hold_an_act(wire_limits(args), size, platform)
    if args.http is not None:
        check_official_cameras(platform.name, platform.cameras)


def _device_list(args: argparse.Namespace) -> list[str]:
    if args.devices is None:
        return []
    devices = [device.strip() for device in args.devices.split(",")]
    if not all(devices):
        raise ConfigError(f"--devices {args.devices!r}: expected comma-separated devices such as cuda:0,cuda:1")
    repeated = sorted({device for device in devices if devices.count(device) > 1})
    if repeated:
        _LOG.warning(
            "--devices %s: %s given more than once; each entry loads its own DiT and planning worker there",
            args.devices,
            ", ".join(repeated),
        )
    return devices
