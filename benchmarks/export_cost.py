"""Export time, bundle size and peak memory of `cosmos-edge export` in bf16 with random weights, ALOHA layout, DiT
batch 1, with the future-image graphs: for the `tiny`, `small` and `predict2-2b` DiT (tiny pairs with the tiny VAE,
the others with the real Wan2.1 VAE; `random_assets.VAE_FOR_DIT`).

Each configuration runs in a child process of its own, so its peak resident memory (ru_maxrss) is the export's
alone; the random checkpoint files are written by another child beforehand and are not timed.

Run: `.venv/bin/python -m benchmarks.export_cost --out benchmarks/results/export_cost_cpu.json [--configs tiny small]`
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import run_context

CONFIGS = ("tiny", "small", "predict2-2b")


class GraphTimes(logging.Handler):
    """Collects the exporter's "exported NAME in S s" records."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("exported ") and isinstance(record.args, tuple):
            name, seconds = record.args[0], record.args[1]
            if isinstance(seconds, float):
                self.seconds[str(name).removesuffix(".onnx")] = seconds


def write_assets(config: str, directory: Path) -> None:
    from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets

    write_random_assets(directory, RandomAssetsSpec(config, "aloha", seed=0, dtype="bf16"))


def export(config: str, directory: Path) -> dict[str, Any]:
    from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle

    times = GraphTimes()
    logging.getLogger("cosmos_edge.export.onnx_export").addHandler(times)
    logging.getLogger("cosmos_edge").setLevel(logging.INFO)
    assets = directory / "assets"
    request = ExportRequest(
        checkpoint=assets / f"cosmos_policy_aloha_{config}.pt",
        tokenizer=assets / "tokenizer.pth",
        stats=assets / "aloha_dataset_statistics.json",
        text_embeddings=assets / "aloha_t5_embeddings.safetensors",
        platform="aloha",
        out=directory / "bundle",
        precision="bf16",
    )
    start = time.perf_counter()
    bundle = export_bundle(request)
    total_s = time.perf_counter() - start
    manifest = bundle.manifest
    graphs = {
        name: {
            "seconds": times.seconds.get(name),
            "bytes": sum(manifest.files[file].size for file in record.files),
            "external_data": record.external_data is not None,
        }
        for name, record in manifest.graphs.items()
    }
    return {
        "config": config,
        "precision": "bf16",
        "export_seconds": total_s,
        "bundle_bytes": sum(record.size for record in manifest.files.values()),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "graphs": graphs,
        "versions": dict(manifest.versions),
    }


def run_child(step: str, config: str, directory: Path) -> dict[str, Any] | None:
    command = [sys.executable, "-m", "benchmarks.export_cost", "--child", step, config, str(directory)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return {"config": config, "failed": step, "stderr_tail": result.stderr[-2000:]}
    return json.loads(result.stdout) if step == "export" else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--out", type=Path, help="JSON file to write the results to")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, config, directory = args.child
        if step == "assets":
            write_assets(config, Path(directory) / "assets")
        else:
            print(json.dumps(export(config, Path(directory))))
        return
    results = []
    for config in args.configs:
        with tempfile.TemporaryDirectory(prefix=f"export-cost-{config}-") as scratch:
            failure = run_child("assets", config, Path(scratch))
            result = failure or run_child("export", config, Path(scratch))
        print(json.dumps(result), flush=True)
        results.append(result)
    report = {
        "command": "python -m benchmarks.export_cost " + " ".join(sys.argv[1:]),
        "machine": run_context.machine(),
        "commit": run_context.commit(),
        "results": results,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
