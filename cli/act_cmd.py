"""`cosmos-edge act`: one policy query, from official files (torch) or a bundle (ONNX Runtime, TensorRT), on an
observation `.npz`; the result is printed and saved."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cosmos_edge.cli.arg_types import int_in_range
from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.cli.model_source import add_model_arguments, model_files, model_source
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
from cosmos_edge.cli.planning_args import (
    add_planning_arguments,
    log_candidates,
    planning_flags_given,
    resolve_planning,
)
from cosmos_edge.runtime.bundle.loader import (
    compiles_dit,
    load_policies,
    source_platform,
    source_stats,
    source_text_embeddings,
)
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource, ModelSource
from cosmos_edge.runtime.errors import ConfigError, InputError, NonFiniteOutput
from cosmos_edge.runtime.platforms import PLATFORMS
from cosmos_edge.runtime.policy.api import (
    MAX_DENOISING_STEPS,
    MAX_SEED,
    ActionQuery,
    ChunkResult,
    Observation,
    PlanningOutcome,
)
from cosmos_edge.runtime.policy.images import check_cameras
from cosmos_edge.runtime.policy.steps import check_proprio_shape

_LOG = logging.getLogger(__name__)

OBSERVATION_FIELDS = ("images", "proprio")  # what an error about the --observation file names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("act", help="run one policy query on an observation .npz")
    add_model_arguments(parser)
    add_observation_arguments(
        parser,
        "npz: one uint8 HxWx3 array per camera, named as the platform's ("
        + "; ".join(f"{name}: {', '.join(spec.cameras)}" for name, spec in sorted(PLATFORMS.items()))
        + "), and `proprio`, float32 of the platform's length ("
        + ", ".join(f"{name} {spec.proprio_dim}" for name, spec in sorted(PLATFORMS.items()))
        + "); ALOHA frames of another size than 224x224 are resized as the official client does "
        "(Pillow bicubic to 256x256, then 224x224)",
    )
    parser.add_argument("--task", required=True, help="the instruction, exactly as in the embeddings file")
    add_frames_argument(parser)
    parser.add_argument(
        "--seed",
        type=int_in_range(0, MAX_SEED),
        default=195,
        help=f"initial noise seed, 0..{MAX_SEED} (default: %(default)s, the official server's)",
    )
    parser.add_argument(
        "--steps",
        type=int_in_range(1, MAX_DENOISING_STEPS),
        default=None,
        metavar="N",
        help=f"denoising steps of the action pass, 1..{MAX_DENOISING_STEPS} (default: the platform's; in planning "
        "mode, --num-denoising-steps-action)",
    )
    parser.add_argument(
        "--mode",
        choices=("reactive", "planning"),
        default="reactive",
        help="reactive: one chunk; planning: the best of N chunks scored with the world model and value function",
    )
    parser.add_argument(
        "--return-all-query-results",
        action="store_true",
        help="planning: also write every candidate's actions (values are always written)",
    )
    parser.add_argument(
        "--device",
        help="torch: a torch device (default cuda when torch sees one, else cpu); onnxruntime: cpu (default), "
        "cuda[:N] or tensorrt[:N] (its "
        "TensorRT provider); tensorrt: cuda[:N] (default cuda)",
    )
    parser.add_argument(
        "--future-images",
        action="store_true",
        help="also decode the predicted future images (planning: the chosen candidate's predicted states, combined by "
        "--future-state-ensemble-aggregation-scheme); slower: the whole clip is then encoded, as the official code "
        "does (its decode needs the placeholder latents), and decoded; written to --out",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="official files only: the official path (numpy/Pillow transforms, all pixel frames through the VAE) "
        "instead of the default exact fast path, for comparison",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="npz to write (never replaces a file): actions, value, future_proprio (+ future_image_<camera>; planning: "
        "chosen_index, planning_outcome, candidate_values, candidate_values_by_depth, + candidate_actions and "
        "candidate_actions_by_depth)",
    )
    add_planning_arguments(parser)
    parser.set_defaults(func=_act)


def _act(args: argparse.Namespace) -> int:
    with naming_flags({"device": "--device"}):  # a bundle's device, checked by its backend as it loads
        return _act_on(args)


def _act_on(args: argparse.Namespace) -> int:
    observation_file = observation_path(args)
    observation = read_observation(observation_file)  # a bad file is named before minutes of loading
    out = None if args.out is None else output_path("--out", args.out)
    if args.future_images:  # seconds of decoding for images nobody would see
        require_out("--future-images", "the images are", out)
    devices = [args.device] if args.device else None
    source = model_source(args, devices or [], device_flag="--device", reference=args.reference)
    observation = _official_observation(source, observation, observation_file, upright=args.frames == "upright")
    _check_task(source, args.task)
    planning = None
    if args.mode != "planning" and (given := planning_flags_given(args) + _planning_only_flags(args)):
        raise ConfigError(
            f"{given[0]}: a planning option, which needs --mode planning (planning options given: {given})"
        )
    if args.mode == "planning":
        if args.steps is not None and args.num_denoising_steps_action is not None:
            raise ConfigError("--steps: in planning mode it is --num-denoising-steps-action; give one of the two")
        if args.return_all_query_results:  # the summary printed holds no candidate's actions
            require_out("--return-all-query-results", "every candidate's results are", out)
        planning, unavailable = resolve_planning(args, source, devices)
        if planning is None:
            raise ConfigError(f"--mode planning: {unavailable}")
        try:
            planning.check_seed(args.seed)
        except InputError as error:  # the query's field, given here by its flag
            raise ConfigError(f"--seed: {str(error).removeprefix(f'{error.field}: ')}") from None
        if args.future_images and not planning.predicts_future_images:
            raise ConfigError(
                "--future-images: Q(s, a) planning without --ar-future-prediction predicts no future state, so it has "
                "no future images (as officially); add --ar-future-prediction for the chosen candidate's"
            )
        log_candidates(args, planning)
    with load_policies(
        source,
        devices=devices,
        planning=planning,
        planning_deadline_ms=args.planning_deadline_ms,
        future_images=args.future_images,  # the decoder graphs load only when asked for
        use_variance_scale=args.use_variance_scale,
    ) as loaded:
        policy = loaded.planning or loaded.reactive
        query = ActionQuery(observation, args.task, args.seed, args.steps, return_future_images=args.future_images)
        if compiles_dit(source):
            _LOG.info(
                "this query compiles the networks first (a minute or more for the 2B model; its stage timings "
                "include it; --no-compile runs eager)"
            )
        _LOG.info("running the %s query", "planning" if loaded.planning is not None else "reactive")
        with _naming_the_observation(observation_file):
            try:
                result = policy.infer(query)
            except NonFiniteOutput as error:
                raise NonFiniteOutput(f"{error}; the model: {model_files(source)}") from None
    print_result(result)
    if out is not None:
        save_result(out, result, all_actions=args.return_all_query_results)
        print(f"wrote {out}")
    return 0


def _check_task(source: ModelSource, task: str) -> None:
    """An unknown --task is named, with the file that lacks it, before minutes of loading."""
    # A bundle's store is hashed into its manifest (a changed one is refused): a new instruction means exporting again.
    remedy = (
        "A bundle holds the instructions it was exported with: embed it (`cosmos-edge text-embeddings embed`), "
        "`text-embeddings merge` it into the file given to `export --text-embeddings`, and export again."
        if isinstance(source, BundleSource)
        else ""
    )
    try:
        source_text_embeddings(source).get(task, remedy=remedy)
    except InputError as error:
        if error.field != "instruction":
            raise
        where = source.files.text_embeddings if isinstance(source, CheckpointSource) else f"bundle {source.path}"
        detail = str(error).removeprefix("instruction: ")
        raise ConfigError(f"--task {task!r}: not among the instructions of {where}: {detail}") from None


def _official_observation(source: ModelSource, observation: Observation, path: Path, upright: bool) -> Observation:
    """The observation, its cameras and proprio checked against the model's platform and statistics before the
    networks load (a minute for the 2B model; the policy checks them again, as every query). ALOHA camera frames of
    another size than 224×224 are resized as the official client resizes them before its server sees them (LIBERO
    and RoboCasa are evaluated in-process, on their frames as they are). `upright` frames of a platform whose
    policy flips them are turned upside down first (a lossless flip), so that the policy's flip restores them."""
    platform = source_platform(source)
    with _naming_the_observation(path):
        check_cameras(platform, observation.images)
        check_proprio_shape(platform, observation.proprio)
        source_stats(source).normalize_proprio(np.asarray(observation.proprio))
    if upright:
        return as_rendered(platform, observation)
    return as_the_aloha_client_sends(observation) if platform.name == "aloha" else observation


@contextlib.contextmanager
def _naming_the_observation(path: Path) -> Iterator[None]:
    """Errors about the observation's images or proprio name the --observation file."""
    try:
        yield
    except InputError as error:
        if error.field not in OBSERVATION_FIELDS:
            raise
        raise InputError(f"observation: {path}: {error}", error.field) from None


def _planning_only_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--return-all-query-results"] if args.return_all_query_results else []
    return flags + (["--planning-checkpoint"] if args.planning_checkpoint is not None else [])


def print_result(result: ChunkResult) -> None:
    print(f"action chunk: {result.actions.shape[0]} x {result.actions.shape[1]} (float32, un-normalised)")
    print(f"value:        {result.value:.6f}")
    if (candidates := result.candidates) is not None:
        if candidates.outcome is PlanningOutcome.REACTIVE:
            unranked = "none scored before the deadline: the base candidate, unranked"
            print(f"candidates:   {len(candidates.values)}, {unranked}")
        else:
            values = ", ".join("-" if np.isnan(value) else f"{value:.6f}" for value in candidates.values)
            print(f"candidates:   {len(candidates.values)}, chose {candidates.chosen}; values {values}")
        print(f"planning:     {candidates.outcome.value}")
    print("stage timings (ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items()))


def save_result(path: Path, result: ChunkResult, all_actions: bool = False) -> None:
    """actions, value, future_proprio (+ future images); for planning, the chosen candidate's index and every
    candidate's values (+ actions with `all_actions`)."""
    arrays: dict[str, np.ndarray] = {
        "actions": result.actions,
        "value": np.array(result.value, dtype=np.float32),
        "future_proprio": result.future_proprio,
    }
    arrays |= {f"future_image_{name}": image for name, image in (result.future_images or {}).items()}
    if result.candidates is not None:
        arrays |= {
            "chosen_index": np.array(result.candidates.chosen),
            "planning_outcome": np.array(result.candidates.outcome.value),
            "candidate_values": result.candidates.values,
            "candidate_values_by_depth": result.candidates.values_by_depth.astype(np.float64),  # as candidate_values
        }
        if all_actions:
            arrays["candidate_actions"] = result.candidates.actions
            arrays["candidate_actions_by_depth"] = result.candidates.actions_by_depth
    write_npz(path, arrays)
