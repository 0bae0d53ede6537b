"""Where `act` and `serve` take their models from: a bundle on an engine backend, or the official checkpoint files on
torch, from the flags both commands share."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource, ModelSource
from cosmos_edge.runtime.engines.registry import GRAPH_BACKENDS, load_torch_backend
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.platforms import PLATFORMS
from cosmos_edge.runtime.precision import COMPILE_SCOPES, PRECISIONS

_OFFICIAL_FILES = {
    "--checkpoint": "checkpoint",
    "--tokenizer": "tokenizer",
    "--stats": "stats",
    "--text-embeddings": "text_embeddings",
}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model's flags, the same in `act` and `serve`: a bundle and its backend, or the official files on torch
    with their precision and how torch runs them."""
    files = parser.add_argument_group("official files (the torch backend)")
    files.add_argument("--checkpoint", type=Path, help="official DiT .pt of the policy (or its diffusers dir)")
    files.add_argument(
        "--tokenizer", type=Path, help="Wan2.1 tokenizer.pth (or a diffusers vae dir, or the model dir holding it)"
    )
    files.add_argument("--stats", type=Path, help="dataset statistics JSON")
    files.add_argument("--text-embeddings", type=Path, help="instruction embeddings (safetensors)")
    files.add_argument(
        "--planning-checkpoint", type=Path, help="official DiT .pt of the planning model (default: the policy's)"
    )
    parser.add_argument("--bundle", type=Path, help="a bundle from `cosmos-edge export`, instead of the files above")
    parser.add_argument(
        "--backend",
        choices=("torch", *GRAPH_BACKENDS),
        help="torch runs the official files (their default); onnxruntime (default with --bundle) or tensorrt runs "
        "a bundle",
    )
    parser.add_argument(
        "--platform",
        choices=sorted(PLATFORMS),
        help="required with the official files; with --bundle, checked against the bundle's",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="official files only (default: bf16 on CUDA devices, fp32 on the CPU; a bundle has its export's)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="official files only: torch.compile the DiT and VAE encode (default: on for CUDA devices, off on CPU)",
    )
    parser.add_argument(
        "--compile-scope",
        choices=COMPILE_SCOPES,
        help="official files, compiled only: what of the DiT is compiled: the whole model as one graph (the default), "
        "or each transformer block, "
        "one graph shared by all (a 2B DiT compiles cold in 11 s against 64 s on 2 CPU cores, at the same call time)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="official files only: replay the camera encode and the batch-1 DiT calls from CUDA graphs (default: on "
        "for CUDA devices)",
    )
    parser.add_argument(
        "--use-variance-scale",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="official use_variance_scale, for every sampling pass of both modes: its sigma_max (and initial noise) "
        "scaled by 1 to 3 and its sigma_min by 0.1 to 1, factors drawn from the pass's seed, for more diverse "
        "samples (default: off, as in every official command); each seed then has its own timesteps, so on CUDA "
        "the graphs captured at warm-up serve the default seed's requests only",
    )


def model_source(
    args: argparse.Namespace, devices: Sequence[str], *, device_flag: str, reference: bool = False
) -> ModelSource:
    """The source the flags name; a bundle mixed with the official files (or their options) is refused.

    `devices` (none: CUDA when torch sees a GPU, else the CPU), given by `device_flag`, choose the default precision
    and compilation of the official files, and are checked here for them (a device torch cannot use is named with the
    flag); `reference` runs them on the official whole-sequence path, uncompiled (`act --reference`).
    """
    if args.bundle is not None:
        return _bundle_source(args, reference)
    return _checkpoint_source(args, devices, device_flag, reference)


def _bundle_source(args: argparse.Namespace, reference: bool) -> BundleSource:
    """The bundle `--bundle` names, refused with any of the official files or of their options."""
    official = {flag: getattr(args, name) for flag, name in _OFFICIAL_FILES.items()}
    mixed = [flag for flag, value in official.items() if value is not None]
    mixed += ["--planning-checkpoint"] if args.planning_checkpoint is not None else []
    mixed += ["--precision"] if args.precision is not None else []  # a bundle's precision is its export's
    mixed += ["--compile" if args.compile else "--no-compile"] if args.compile is not None else []
    mixed += ["--compile-scope"] if args.compile_scope is not None else []
    mixed += ["--cuda-graphs" if args.cuda_graphs else "--no-cuda-graphs"] if args.cuda_graphs is not None else []
    mixed += ["--reference"] if reference else []
    mixed += ["--backend torch"] if args.backend == "torch" else []
    if mixed:
        raise ConfigError(
            f"--bundle: runs on --backend onnxruntime or tensorrt without the official files or their options (a "
            f"bundle carries its planning model and precision); got {mixed}"
        )
    return BundleSource(args.bundle, args.backend or "onnxruntime", args.platform)


def _checkpoint_source(
    args: argparse.Namespace, devices: Sequence[str], device_flag: str, reference: bool
) -> CheckpointSource:
    """The official files the flags name, with the defaults of `devices` for what the flags leave out."""
    official = {flag: getattr(args, name) for flag, name in _OFFICIAL_FILES.items()}
    missing = [flag for flag, value in {**official, "--platform": args.platform}.items() if value is None]
    if missing:
        raise ConfigError(f"expected --bundle, or the official files and --platform (torch); missing {missing}")
    if args.backend not in (None, "torch"):
        raise ConfigError(f"--backend {args.backend}: runs a --bundle; the official files run on torch")
    files_given = {**official, "--planning-checkpoint": args.planning_checkpoint}
    for flag, path in files_given.items():  # named now, not after the files before it have loaded
        if path is not None and not path.exists():
            raise ConfigError(f"{flag} {path}: no such file")
    _check_torch_devices(device_flag, devices)
    faster = {"--compile": args.compile, "--cuda-graphs": args.cuda_graphs}
    faster[f"--compile-scope {args.compile_scope}"] = args.compile_scope is not None
    if reference and (given := [flag for flag, on in faster.items() if on]):
        raise ConfigError(f"{given[0]}: --reference runs the official path uncompiled, without graphs; drop one")
    with naming_flags({"cuda_graphs": "--cuda-graphs"}):
        source = CheckpointSource.for_devices(
            CheckpointFiles(args.checkpoint, args.tokenizer, args.stats, args.text_embeddings, args.platform),
            devices,
            planning_checkpoint=args.planning_checkpoint,
            precision=args.precision,
            compile=args.compile,
            compile_scope=args.compile_scope or "model",
            cuda_graphs=args.cuda_graphs,
            reference=reference,
        )
    if args.compile_scope is not None and source.compile_mode is None:
        raise ConfigError(
            f"--compile-scope {args.compile_scope}: compilation is off (--no-compile, or the CPU default); "
            "add --compile"
        )
    return source


def model_files(source: ModelSource) -> str:
    """The files of the networks behind `source`, by the flags that named them."""
    if isinstance(source, BundleSource):
        return f"--bundle {source.path}"
    files = source.files
    named = {"--checkpoint": files.checkpoint, "--planning-checkpoint": source.planning_checkpoint}
    named |= {"--tokenizer": files.tokenizer, "--text-embeddings": files.text_embeddings}
    return ", ".join(f"{flag} {path}" for flag, path in named.items() if path is not None)


def _check_torch_devices(flag: str, devices: Sequence[str]) -> None:
    torch_backend = load_torch_backend()
    for device in devices:
        torch_backend.check_device(device, name=flag)
