"""ONNX Runtime (CPU provider) against torch eager on this CPU, fp32, at the `small` DiT with the real Wan2.1 VAE
(random weights), ALOHA layout: one DiT call (batch 1, 11 latent frames, 2156 tokens) and one conditioning-prefix
VAE encode (the 12 camera frames after the 5 black ones, as both backends serve it, at 224x224).

Both backends run in the same test on the same inputs, interleaved: pytest-benchmark times the ONNX Runtime call,
and its untimed `setup` hook, run before every round, times one torch call, so both backends see the same load on
a shared machine. `extra_info` holds both medians and their ratio (torch / onnxruntime, > 1 means ONNX Runtime is
faster). torch runs as the torch backend serves: the DiT with the instruction's
cross-attention K/V precomputed (`TorchDiT.bind_text`); the ONNX graph recomputes them inside every call.

Run: `.venv/bin/python -m pytest benchmarks/test_backends_cpu.py --benchmark-enable
--benchmark-json benchmarks/results/cpu_backends.json` (the export of the small bundle takes about a minute).
"""

from __future__ import annotations

import os
import platform as host
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.onnxruntime_runner import open_graph
from cosmos_edge.runtime.engines.torch_networks import TorchDiT, open_denoiser
from cosmos_edge.runtime.models.prefix_encoder import BlackPrefixEncoder
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.models.wan_vae import WanVAE
from cosmos_edge.runtime.platforms import platform_spec

ALOHA = platform_spec("aloha")

ROUNDS = {"dit": 7, "vae": 3}
WARMUP_ROUNDS = 1


@dataclass(frozen=True)
class SmallSetup:
    bundle: Bundle
    dit: TorchDiT
    vae: WanVAE
    text: np.ndarray


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> SmallSetup:
    root = tmp_path_factory.mktemp("small")
    files = write_random_assets(root / "assets", RandomAssetsSpec("small", "aloha", seed=0))
    request = ExportRequest(
        files.checkpoint,
        files.tokenizer,
        files.stats,
        files.text_embeddings,
        "aloha",
        root / "bundle",
        precision="fp32",
        future_images=False,
    )
    bundle = export_bundle(request)
    embeddings = bundle.text_embeddings()
    return SmallSetup(
        bundle=bundle,
        dit=open_denoiser(files.checkpoint, "fp32", "cpu"),  # as the torch backend serves it (fused QKV)
        vae=load_wan_vae(files.tokenizer).eval(),
        text=embeddings.get(embeddings.instructions[0]),
    )


def compare(
    benchmark: Any, onnxruntime_call: Callable[[], object], torch_call: Callable[[], object], rounds: int
) -> float:
    """Times `onnxruntime_call` with pytest-benchmark and one `torch_call` before each of its rounds; returns the
    torch median (warm-up rounds excluded)."""
    torch_seconds: list[float] = []

    def torch_round() -> None:
        start = time.perf_counter()
        torch_call()
        torch_seconds.append(time.perf_counter() - start)

    benchmark.pedantic(onnxruntime_call, setup=torch_round, rounds=rounds, warmup_rounds=WARMUP_ROUNDS)
    return statistics.median(torch_seconds[WARMUP_ROUNDS:])


def record(benchmark: Any, torch_s: float, what: str) -> None:
    ort_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "workload": what,
            "precision": "fp32",
            "machine": f"{host.processor() or host.machine()}, {os.cpu_count()} logical CPUs",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": ort.__version__,
            "torch_median_s": torch_s,
            "onnxruntime_median_s": ort_s,
            "speedup_onnxruntime_over_torch": torch_s / ort_s,
        }
    )


def test_dit_call(benchmark: Any, small: SmallSetup) -> None:
    runner = open_graph(small.bundle.graph_file("dit_b1"), "cpu")
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal(runner.spec.inputs[0].shape).astype(np.float32),
        "timesteps": np.full(runner.spec.inputs[1].shape, 0.9, np.float32),
        "condition_mask": np.zeros(runner.spec.inputs[2].shape, np.float32),
        "text_embedding": small.text,
    }
    network = small.dit.bind_text(small.text)
    torch_s = compare(
        benchmark,
        lambda: runner.run(feeds),
        lambda: network(feeds["x"], feeds["timesteps"], feeds["condition_mask"]),
        ROUNDS["dit"],
    )
    record(benchmark, torch_s, "small DiT, batch 1, 2156 tokens")


def test_prefix_vae_encode(benchmark: Any, small: SmallSetup) -> None:
    # Both encode the prefix's 12 camera frames after its 5 black ones: ONNX Runtime with the black frames' latent
    # and causal context as constants of its graph, torch with them cached (`BlackPrefixEncoder`).
    runner = open_graph(small.bundle.graph_file("vae_encoder_cameras"), "cpu")
    cameras = np.random.default_rng(1).uniform(-1, 1, runner.spec.inputs[0].shape).astype(np.float32)
    with torch.inference_mode():
        encoder = BlackPrefixEncoder(small.vae, ALOHA)

    @torch.inference_mode()
    def torch_call() -> torch.Tensor:
        return encoder(torch.from_numpy(cameras))

    torch_s = compare(benchmark, lambda: runner.run({"video": cameras}), torch_call, ROUNDS["vae"])
    record(benchmark, torch_s, "Wan2.1 encoder, the 12 camera frames of the 17-frame prefix, 224x224")
