"""How long `torch.compile` takes to compile the DiT, per compile scope (`--compile-scope model|blocks`), and the call
time after it, on this machine's CPU.

Each (config, scope) runs in a child process of its own with Inductor's caches off, so every compilation is cold;
then twice more on a fresh cache directory, the second time as a restart would (the cache the first one filled). The
DiT has random weights in fp32 and is called through the torch backend (`TorchDiT`) at batch 1 on 11 latent frames
of 4x4 (44 tokens): compilation does not depend on the grid, the call time does, and at ALOHA's 28x28 one 2B call
takes minutes on 2 cores.

Run: `.venv/bin/python -m benchmarks.compile_time --out benchmarks/results/cpu_compile_time.json [--configs small]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import run_context

CONFIGS = ("small", "predict2-2b")
SCOPES = ("model", "blocks")
CALLS = 3


def measure(config: str, scope: str) -> dict[str, Any]:
    import numpy as np
    import torch

    from cosmos_edge.runtime.engines.torch_networks import TorchDiT
    from cosmos_edge.runtime.models.dit import CosmosDiT
    from cosmos_edge.runtime.models.dit_config import dit_config

    torch.manual_seed(0)
    dit_settings = dit_config(config)
    dit = CosmosDiT(dit_settings).eval()
    dit.fuse_qkv()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 11, 4, 4)).astype(np.float32)
    timesteps = np.where(np.arange(11) < 5, 0.0, 0.9877).astype(np.float32)[None]
    mask = np.zeros((1, 1, 11, 4, 4), np.float32)
    mask[:, :, :5] = 1.0
    text = rng.standard_normal((1, 512, dit_settings.text_dim)).astype(np.float32)

    def call_seconds(network: Any) -> list[float]:
        seconds = []
        for _ in range(CALLS + 1):
            started = time.perf_counter()
            network(x, timesteps, mask)
            seconds.append(time.perf_counter() - started)
        return seconds

    eager = call_seconds(TorchDiT(dit, torch.device("cpu")).bind_text(text))
    compiled = call_seconds(TorchDiT(dit, torch.device("cpu"), "default", compile_scope=scope).bind_text(text))
    return {
        "config": config,
        "scope": scope,
        "first_call_s": round(compiled[0], 1),
        "compiled_call_ms_median": round(1e3 * sorted(compiled[1:])[CALLS // 2], 1),
        "eager_call_ms_median": round(1e3 * sorted(eager[1:])[CALLS // 2], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "SCOPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    import torch

    report: dict[str, Any] = {
        "machine": run_context.machine(),
        "commit": run_context.commit(),
        "torch": torch.__version__,
        "command": "python -m benchmarks.compile_time " + " ".join(sys.argv[1:]),
        "grid": "batch 1, 11 latent frames of 4x4, fp32, mode 'default'",
        "first_call_s": "Inductor's caches off (a cold start); restart_first_call_s: a second start on the cache the "
        "first one filled (TORCHINDUCTOR_CACHE_DIR)",
        "results": [],
    }
    for config in args.configs:
        for scope in SCOPES:
            child = [sys.executable, "-m", "benchmarks.compile_time", "--out", str(args.out), "--child", config, scope]
            result = run_child(child, {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
            with tempfile.TemporaryDirectory() as cache:  # a first start fills Inductor's cache, a restart reads it
                run_child(child, {"TORCHINDUCTOR_CACHE_DIR": cache})
                result["restart_first_call_s"] = run_child(child, {"TORCHINDUCTOR_CACHE_DIR": cache})["first_call_s"]
            print(json.dumps(result), flush=True)
            report["results"].append(result)
            args.out.write_text(json.dumps(report, indent=2) + "\n")


def run_child(command: list[str], environment: dict[str, str]) -> dict[str, Any]:
    finished = subprocess.run(command, env=os.environ | environment, capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    main()
