"""`cosmos-edge demo`: the whole chain on a CPU with no download.

The embedded default (a seeded random-weight `tiny` ALOHA model in the official file formats) is served over
ZeroMQ; the ALOHA chunk executor drives gym-aloha through the safety filter on the simulation's clock (a tick per
rendered step: slower than real time on a CPU). With random weights the robot does nothing useful: the demo
exercises the runtime, not the policy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cosmos_edge.cli.arg_types import int_in_range, positive_int
from cosmos_edge.cli.extras import require_extra
from cosmos_edge.cli.run_report import print_run_report
from cosmos_edge.robot_bridge.controller.chunk_source import (
    ActParams,
    Chunk,
    ChunkRequest,
    Outcome,
    ThreadedChunkSource,
)
from cosmos_edge.robot_bridge.controller.executor import ChunkExecutor, ExecutorConfig, Robot
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import sha256_file
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED, Observation

DEMO_TASK = "transfer_cube"
FRAME_EVERY_TICKS = 25
# Marks an --out directory as the demo's own: a later demo may replace what an earlier one wrote there, nothing else.
OWN_DIRECTORY_MARK = ".cosmos-edge-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="serve the built-in tiny model to a simulated ALOHA (no download)")
    parser.add_argument("--chunks", type=positive_int, default=3, help="action chunks to execute (50 ticks each)")
    parser.add_argument(
        "--steps",
        type=int_in_range(1, MAX_DENOISING_STEPS),
        default=None,
        metavar="N",
        help=f"denoising steps, 1..{MAX_DENOISING_STEPS} (default: ALOHA's 10)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("out/demo"),
        help="where the model and images go: a new or empty directory, or one an earlier demo wrote",
    )
    parser.add_argument(
        "--seed",
        type=int_in_range(0, MAX_SEED),
        default=0,
        help="seed of the random weights and of the simulation",
    )
    parser.set_defaults(func=_demo)


class RecordingRobot:
    """Keeps every `FRAME_EVERY_TICKS`-th overhead frame for the episode strip, from `overhead_frame` (the frame the
    simulator already rendered: no extra rendering on the cores the policy uses)."""

    def __init__(self, robot: Robot, overhead_frame: Callable[[], np.ndarray]) -> None:
        self._robot = robot
        self._overhead_frame = overhead_frame
        self._ticks = 0
        self.frames: list[np.ndarray] = []

    def observe(self) -> Observation:
        return self._robot.observe()

    def current_qpos(self) -> np.ndarray:
        return self._robot.current_qpos()

    def command(self, qpos_target: np.ndarray) -> None:
        self._robot.command(qpos_target)
        if self._ticks % FRAME_EVERY_TICKS == 0:
            self.frames.append(self._overhead_frame())
        self._ticks += 1


class RecordingSource:
    """Passes requests through and keeps every answered chunk with its wall-clock round trip (the executor's clock
    is simulated time here), for the latency table."""

    def __init__(self, source: ThreadedChunkSource) -> None:
        self._source = source
        self._submitted: dict[int, float] = {}
        self.chunks: list[tuple[Chunk, float]] = []
        self._failure_shown = False

    @property
    def busy(self) -> bool:
        return self._source.busy

    def submit(self, request: ChunkRequest) -> None:
        self._submitted[request.obs_id] = time.perf_counter()
        self._source.submit(request)

    def poll(self) -> Outcome | None:
        outcome = self._source.poll()
        if outcome is not None:
            submitted = self._submitted.pop(outcome.obs_id)
            if isinstance(outcome, Chunk):
                round_trip_ms = (time.perf_counter() - submitted) * 1e3
                self.chunks.append((outcome, round_trip_ms))
                print(f"      policy reply {len(self.chunks)}: {round_trip_ms / 1e3:.1f} s round trip", flush=True)
            elif not self._failure_shown:  # the logs are quiet here: say why once (the counters count them)
                self._failure_shown = True
                print(f"      policy request failed: {outcome.error}", flush=True)
        return outcome


def _demo(args: argparse.Namespace) -> int:
    require_extra("demo", "torch", "torch")
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first MuJoCo import
    require_extra("demo", "sim", "gym_aloha")
    # The tables printed at the end summarise the per-request log lines and safety warnings.
    with _quiet_logs(enabled=not args.verbose), _single_torch_thread():
        return _run_demo(args)


@contextmanager
def _single_torch_thread() -> Iterator[None]:
    """The simulator renders on the same CPU cores as the policy: one intra-op thread avoids OpenMP
    oversubscription (on 2 cores it cut the policy round trip from about 7.0 s to 2.7 s)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def _quiet_logs(enabled: bool) -> Iterator[None]:
    logger = logging.getLogger("cosmos_edge")
    previous = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _run_demo(args: argparse.Namespace) -> int:
    from cosmos_edge.robot_bridge.binding import ServerConfig
    from cosmos_edge.robot_bridge.client import PolicyClient
    from cosmos_edge.robot_bridge.controller.safety import SafetyConfig, SafetyFilter
    from cosmos_edge.robot_bridge.robots.aloha_sim import AlohaSimRobot
    from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_observation
    from cosmos_edge.robot_bridge.server import PolicyServer, serving_in_thread
    from cosmos_edge.runtime.bundle.loader import load_policies
    from cosmos_edge.runtime.bundle.sources import CheckpointSource
    from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets

    _claim_out_directory(args.out, args.out / "model")
    print("cosmos-edge demo: random weights, so the robot does nothing useful; this exercises the runtime.")
    print(f"[1/4] writing the embedded default (tiny ALOHA model, seed {args.seed}) to {args.out / 'model'}")
    files = write_random_assets(args.out / "model", RandomAssetsSpec("tiny", "aloha", args.seed))
    _record_demo_files(args.out)
    with contextlib.ExitStack() as serving:
        loaded = serving.enter_context(load_policies(CheckpointSource(files)))
        instruction = loaded.reactive.instructions[0]
        print("[2/4] starting the policy server")
        server = PolicyServer(loaded.modes(), ServerConfig(endpoint="tcp://127.0.0.1:*"))
        endpoint = serving.enter_context(serving_in_thread(server))
        print(f"      serving on {endpoint}")
        ticks = args.chunks * loaded.reactive.platform.chunk_size
        chunks = f"{args.chunks} chunk{'s' * (args.chunks != 1)}"
        print(
            f"[3/4] running gym-aloha ({DEMO_TASK}) for {ticks} ticks of simulated time ({chunks} of actions; the "
            "executor asks for the next chunk before the one in hand runs out)"
        )
        sim = AlohaSimRobot.create(DEMO_TASK, seed=args.seed, control_rate_hz=25.0)
        robot = RecordingRobot(sim, sim.overhead_frame)
        safety = SafetyFilter(SafetyConfig())
        started = time.perf_counter()
        with (
            contextlib.closing(sim),
            PolicyClient(endpoint, timeout_s=60.0) as client,
            ThreadedChunkSource(
                client, ActParams(instruction, steps=args.steps), prepare=aloha_wire_observation
            ) as threaded,
        ):
            source = RecordingSource(threaded)
            executor = ChunkExecutor(
                robot, source, safety, ExecutorConfig(), clock=sim.sim_time_ns, sleep=lambda _: None
            )
            try:
                summary = executor.run(num_ticks=ticks)
            finally:  # the run is over: a request in flight is cancelled, not waited for
                threaded.stop_requests()
                client.close()
    print(f"[4/4] done in {time.perf_counter() - started:.1f} s wall time\n")
    _print_latencies(source.chunks)
    print()
    print_run_report(executor, safety, summary)
    _print_round_trip(executor)
    print(f"simulation ({DEMO_TASK}): last reward {sim.reward:g}, task solved: {'yes' if sim.success else 'no'}")
    strip = _write_strip(robot.frames, args.out / "episode.png")
    _record_demo_files(args.out)
    print(f"episode strip (cam_high every {FRAME_EVERY_TICKS} ticks): {strip}")
    return 0 if source.chunks else 1  # a run without a single policy reply failed


def _claim_out_directory(out: Path, model: Path) -> None:
    """Makes `out` the demo's own: refused when it holds a file the demo did not write there, or one changed since
    it did (a real `tokenizer.pth` put over the demo's, say: the demo replaces the files it writes). The mark lists
    each file the demo wrote with its SHA-256 (`_record_demo_files`); a directory of a demo that predates the mark
    (or whose mark predates the list) is recognised by holding that model's tiny checkpoint and nothing else."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a directory (new, empty, or an earlier demo's)")
    try:
        offending = _not_the_demos(out, model) if out.is_dir() and any(out.iterdir()) else None
        if offending is not None:
            raise ConfigError(
                f"--out {out}: holds files the demo did not write{offending}, and the demo replaces the files it "
                "writes there (model/, episode.png); choose a new or empty directory"
            )
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot write there ({error})") from None
    _record_demo_files(out)


def _not_the_demos(out: Path, model: Path) -> str | None:
    """None when every file under `out` is one the demo wrote, as it wrote it; else what to add to the refusal."""
    written = _recorded_demo_files(out / OWN_DIRECTORY_MARK)
    if written is None:  # no list: a demo's directory from before the list, or not the demo's at all
        return None if _an_earlier_demos(out, model) else ""
    changed = [name for name, digest in _demo_files(out).items() if written.get(name) != digest]
    return f" or that changed since it did ({changed[0]})" if changed else None


def _demo_files(out: Path) -> dict[str, str]:
    """Every file under `out` but the mark, by its path relative to `out` → its SHA-256."""
    return {
        path.relative_to(out).as_posix(): sha256_file(path)
        for path in sorted(out.rglob("*"))
        if path.is_file() and path.name != OWN_DIRECTORY_MARK
    }


def _record_demo_files(out: Path) -> None:
    """Marks `out` as the demo's, listing the files it holds now (the demo's own, once claimed)."""
    record = {"written_by": "cosmos-edge demo: a later demo may replace these files", "files": _demo_files(out)}
    try:
        (out / OWN_DIRECTORY_MARK).write_text(json.dumps(record, indent=1) + "\n")
    except OSError as error:
        raise ConfigError(f"--out {out}: cannot write there ({error})") from None


def _recorded_demo_files(mark: Path) -> dict[str, str] | None:
    """The files the mark lists, or None without a mark that lists them."""
    try:
        files = json.loads(mark.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if isinstance(files, dict) else None


def _an_earlier_demos(out: Path, model: Path) -> bool:
    from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, random_asset_paths

    files = random_asset_paths(model, RandomAssetsSpec("tiny", "aloha"))
    names = {files.checkpoint.name, files.tokenizer.name, files.stats.name, files.text_embeddings.name}
    outside = {entry.name for entry in out.iterdir()} - {model.name, "episode.png", OWN_DIRECTORY_MARK}
    return not outside and files.checkpoint.is_file() and {entry.name for entry in model.iterdir()} <= names


def _print_round_trip(executor: ChunkExecutor) -> None:
    # The executor's clock is the simulation's, which advances a tick per rendered step and nothing while the policy
    # computes; so the round trip it measures is the simulated time rendered meanwhile, set by the CPU's speed.
    latency = "n/a" if executor.latency_ms is None else f"{executor.latency_ms:.0f} ms"
    print(
        f"inference round trip in simulated time (the ticks rendered while a reply was computed; the wall-clock one "
        f"is in the latency table): {latency}; "
        f"prefetch at {executor.prefetch_threshold} actions left; "
        f"starved ticks: {executor.counters.starved_ticks}"
    )


def _print_latencies(chunks: list[tuple[Chunk, float]]) -> None:
    if not chunks:
        print("no chunk arrived")
        return
    stages = list(dict.fromkeys(name for chunk, _ in chunks for name in chunk.timings_ms))
    rows = [(name, [chunk.timings_ms.get(name, 0.0) for chunk, _ in chunks]) for name in stages]
    rows.append(("round trip (wall clock)", [round_trip for _, round_trip in chunks]))
    print(f"latency over {len(chunks)} policy replies (ms, tiny model on this CPU)")
    print(f"  {'stage':24s} {'p50':>9s} {'max':>9s}")
    for name, values in rows:
        print(f"  {name:24s} {np.median(values):9.1f} {np.max(values):9.1f}")


def _write_strip(frames: list[np.ndarray], path: Path) -> Path:
    from PIL import Image

    thumbnails = [Image.fromarray(frame).resize((160, 120)) for frame in frames]
    strip = Image.new("RGB", (160 * max(1, len(thumbnails)), 120))
    for index, thumbnail in enumerate(thumbnails):
        strip.paste(thumbnail, (160 * index, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path)
    return path
