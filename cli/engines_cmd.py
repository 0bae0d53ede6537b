"""`cosmos-edge engines build BUNDLE`: TensorRT engines for this machine's GPU, recorded in the bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from cosmos_edge.runtime.engines.registry import cuda_index
from cosmos_edge.runtime.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("engines", help="TensorRT engines of a bundle")
    commands = parser.add_subparsers(dest="engines_command")
    build = commands.add_parser("build", help="build every graph's engine on this GPU (needs TensorRT >= 10)")
    build.add_argument("bundle", type=Path, help="the bundle directory (`cosmos-edge export --out`)")
    build.add_argument("--device", type=cuda_device, default="cuda", help="the CUDA device: cuda or cuda:N")
    build.add_argument(
        "--graph",
        action="append",
        default=[],
        help="only this graph (repeatable): a name of the bundle's manifest.json, such as dit_b1, dit_b8, "
        "vae_encoder_cameras, vae_encoder_full, vae_decoder",
    )
    build.set_defaults(func=_build)


def cuda_device(text: str) -> int:
    """The CUDA device index of "cuda" or "cuda:N", as the other commands name a GPU."""
    try:
        return cuda_index(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(f"expected cuda or cuda:N, got {text!r}") from None


def _build(args: argparse.Namespace) -> int:
    from cosmos_edge.export.engine_builder import build_bundle_engines

    bundle = build_bundle_engines(args.bundle, args.device, tuple(args.graph))
    for name, entry in bundle.manifest.engines.items():
        fused = entry.get("fused_attention_count", "an unrecorded number of")  # an entry edited by hand
        print(f"{name}: {entry['file']}, {fused} fused attention layers")
    return 0
