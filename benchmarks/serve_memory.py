"""Resident memory of a serving process once `serve` has built its policies from checkpoint files (fp32, CPU).

    .venv/bin/cosmos-edge checkpoint random --config small --platform aloha --out /tmp/small_assets
    .venv/bin/python benchmarks/serve_memory.py /tmp/small_assets

Prints one JSON line; recorded in benchmarks/results/cpu_serve_memory.json. Without --planning-checkpoint the reactive
and planning policies share one DiT and one VAE per device.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

from cosmos_edge.cli import serve_cmd


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def main(assets: Path) -> None:
    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    files = ["--checkpoint", assets / "cosmos_policy_aloha_small.pt", "--tokenizer", assets / "tokenizer.pth"]
    files += ["--stats", assets / "aloha_dataset_statistics.json"]
    files += ["--text-embeddings", assets / "aloha_t5_embeddings.safetensors", "--platform", "aloha"]
    args = parser.parse_args(["serve", *map(str, files), "--precision", "fp32", "--devices", "cpu"])
    before = rss_mib()
    with serve_cmd.served_policies(args):
        after = rss_mib()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rss_before_load_mib": round(before, 1),
                "rss_after_load_mib": round(after, 1),
                "peak_rss_mib": round(peak, 1),
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
