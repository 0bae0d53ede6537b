"""`cosmos-edge checkpoint ...`: inspect official checkpoint files and create random ones in their formats."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cosmos_edge.cli.arg_types import int_in_range
from cosmos_edge.cli.extras import require_extra
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.platforms import PLATFORMS
from cosmos_edge.runtime.policy.api import MAX_SEED
from cosmos_edge.runtime.precision import PRECISIONS


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect or create checkpoint files")
    commands = parser.add_subparsers(dest="checkpoint_command")

    inspect = commands.add_parser(
        "inspect",
        help="format, inferred configuration, parameter count, dtypes and problems of a DiT or VAE file",
        description="Reports what a DiT or VAE file holds; exit status 1 when it found problems (missing, "
        "unexpected or wrongly shaped tensors, NaN or infinity), as a check in a script would want; a file of no "
        "known network is an error (2).",
    )
    inspect.add_argument("path", type=Path, help="DiT .pt, Wan2.1 tokenizer.pth, safetensors, or a diffusers dir")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_inspect)

    random = commands.add_parser("random", help="write a random-weight model in the official file formats")
    random.add_argument(
        "--config",
        default="tiny",
        choices=("tiny", "small", "predict2-2b"),
        help="network size: tiny (tests), small (CPU benchmarks, real VAE), predict2-2b (the real sizes)",
    )
    random.add_argument("--platform", default="aloha", choices=sorted(PLATFORMS), help="slot layout and statistics")
    random.add_argument("--seed", type=int_in_range(0, MAX_SEED), default=0, help="seed of the random weights")
    random.add_argument(
        "--dtype", "--precision", dest="dtype", default="fp32", choices=PRECISIONS, help="weights' dtype"
    )
    random.add_argument(
        "--out", type=Path, required=True, help="directory to write into (refused if it holds a file of the same name)"
    )
    random.set_defaults(func=_random)


def _inspect(args: argparse.Namespace) -> int:
    require_extra("checkpoint inspect", "torch", "torch")
    from cosmos_edge.runtime.models.checkpoint_inspection import inspect_checkpoint

    report = inspect_checkpoint(args.path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    return 0 if not report["problems"] else 1


def _print_report(report: dict[str, Any]) -> None:
    print(f"file:        {report['path']}")
    print(f"network:     {report['network']}")
    print(f"format:      {report['format']}")
    print(f"parameters:  {report['num_parameters']:,}")
    print(f"dtypes:      {report['dtypes']} (parameter elements)")
    print("config:      " + ", ".join(f"{k}={v}" for k, v in report["config"].items()))
    if report["ignored_keys"]:
        print(f"ignored:     {len(report['ignored_keys'])} keys (e.g. {report['ignored_keys'][:3]})")
    print("problems:    " + ("none" if not report["problems"] else "\n  - " + "\n  - ".join(report["problems"])))


def _random(args: argparse.Namespace) -> int:
    require_extra("checkpoint random", "torch", "torch")
    from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, random_asset_paths, write_random_assets

    spec = RandomAssetsSpec(args.config, args.platform, args.seed, args.dtype)
    paths = random_asset_paths(args.out, spec)
    # Official files go by these names too: a random tokenizer.pth must never replace a real one.
    written = (paths.checkpoint, paths.tokenizer, paths.stats, paths.text_embeddings)
    present = [str(path) for path in written if path.exists()]
    if present:
        raise ConfigError(f"--out {args.out}: would replace {present}; choose another directory or remove them")
    files = write_random_assets(args.out, spec)
    print(f"wrote a random-weight {args.config} {args.platform} model (seed {args.seed}, {args.dtype}):")
    for name in ("checkpoint", "tokenizer", "stats", "text_embeddings"):
        print(f"  {name:16s} {getattr(files, name)}")
    return 0
