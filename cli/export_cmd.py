"""`cosmos-edge export`: official checkpoint files -> a deployable bundle directory (ONNX graphs + manifest)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cosmos_edge.cli.extras import require_extra
from cosmos_edge.cli.flag_names import naming_flags
from cosmos_edge.runtime.bundle.manifest import check_batch_sizes
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.platforms import PLATFORMS
from cosmos_edge.runtime.precision import PRECISIONS, default_precision


def batch_sizes(text: str) -> tuple[int, ...]:
    """ "1,8" -> (1, 8), checked as the export checks them (before its imports take seconds)."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,8, got {text!r}") from None
    try:
        return check_batch_sizes(sizes)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("batch_sizes: ")) from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export official checkpoints to a deployable bundle")
    parser.add_argument("--checkpoint", type=Path, required=True, help="official DiT .pt (or diffusers dir)")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="Wan2.1 tokenizer.pth (or a diffusers vae dir, or the model dir holding it)",
    )
    parser.add_argument("--stats", type=Path, required=True, help="dataset statistics JSON")
    parser.add_argument("--text-embeddings", type=Path, required=True, help="instruction embeddings (safetensors)")
    parser.add_argument("--platform", required=True, choices=sorted(PLATFORMS), help="the checkpoint's robot platform")
    parser.add_argument("--out", type=Path, required=True, help="bundle directory to create (a new or empty directory)")
    parser.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        default=(1,),
        help="DiT batch sizes: 1 serves the reactive mode (default 1); planning needs candidates / devices among "
        "them (best of 8 on one GPU: 1,8), or serves one candidate at a time under --planning-deadline-ms",
    )
    parser.add_argument(
        "--for",
        dest="target",
        choices=("cpu", "cuda"),
        help="where the bundle will be served (default: cuda if this machine has a CUDA device, else cpu); it sets "
        "the default precision and refuses one the target cannot run",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="precision inside the graphs (default: bf16, the official one, for cuda; fp32 for cpu, whose "
        "onnxruntime provider has no bf16 kernels)",
    )
    parser.add_argument("--planning-checkpoint", type=Path, help="DiT .pt of a separate planning model")
    parser.add_argument(
        "--no-future-images",
        action="store_true",
        help="leave out the full-sequence encoder and the decoder: a smaller bundle that serves both modes but cannot "
        "return future images",
    )
    parser.set_defaults(func=_export)


# The export request's fields, as its errors name them, and the flags that give them.
_FLAGS = {
    "checkpoint": "--checkpoint",
    "tokenizer": "--tokenizer",
    "stats": "--stats",
    "text_embeddings": "--text-embeddings",
    "planning_checkpoint": "--planning-checkpoint",
    "batch_sizes": "--batch-sizes",
    "precision": "--precision",
}


def _export(args: argparse.Namespace) -> int:
    # Export needs torch and onnx; serving does not, so they are imported only here.
    require_extra("export", "torch,onnx", "torch", "onnx")
    import torch

    from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle

    target = args.target or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision or default_precision([target])
    if target == "cpu" and precision == "bf16":
        raise ConfigError(
            "--precision bf16 --for cpu: onnxruntime's CPU provider has no bfloat16 kernels; export fp32 or fp16 "
            "for the CPU, or --for cuda to serve it on a GPU"
        )
    print(f"exporting for {target} in {precision} (change with --for / --precision)")

    with naming_flags(_FLAGS):
        request = ExportRequest(
            checkpoint=args.checkpoint,
            tokenizer=args.tokenizer,
            stats=args.stats,
            text_embeddings=args.text_embeddings,
            platform=args.platform,
            out=args.out,
            batch_sizes=args.batch_sizes,
            precision=precision,
            planning_checkpoint=args.planning_checkpoint,
            future_images=not args.no_future_images,
        )
        bundle = export_bundle(request)
    manifest = bundle.manifest
    total = sum(record.size for record in manifest.files.values())
    print(f"bundle {bundle.root}: {manifest.platform.name}, {manifest.precision}, {total / 2**20:.1f} MiB")
    for name, record in manifest.graphs.items():
        size = sum(manifest.files[file].size for file in record.files)
        print(f"  {name:<20} {size / 2**20:9.1f} MiB")
    return 0
