"""ONNX Runtime (CPU provider) against torch eager on this CPU, fp32, at the `small` DiT with the real Wan2.1 VAE
(random weights), ALOHA layout: one DiT call (batch 1, 11 latent frames, 2156 tokens) and one conditioning-prefix
VAE encode (the 12 camera frames after the 5 black ones, as both backends serve it, at 224x224).

Both backends run in the same test on the same inputs, interleaved: pytest-benchmark times the ONNX Runtime call,
and its untimed `setup` hook, run before every round, times one torch call, so both backends see the same load on
a shared machine. `extra_info` holds both medians and their ratio (torch / onnxruntime, > 1 means ONNX Runtime is
faster). Both run the DiT as their backend serves it, with the instruction's cross-attention K/V computed once
(`TorchDiT.bind_text`; the bundle's `dit_text_kv` graph). `test_text_kv_input` measures what that saves a DiT graph
call, against a graph that projects the K/V inside every call (as bundles of schema 2 did).

Run: `.venv/bin/python -m pytest benchmarks/test_backends_cpu.py --benchmark-enable
--benchmark-json benchmarks/results/cpu_backends.json` (the export of the small bundle takes about a minute).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from benchmarks import run_context
from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle
from cosmos_edge.export.onnx_export import DiTGraph, export_graph
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.graph import GraphFile, GraphSpec
from cosmos_edge.runtime.engines.onnxruntime_runner import open_graph
from cosmos_edge.runtime.engines.torch_networks import TorchDiT, open_dit
from cosmos_edge.runtime.models.dit import CosmosDiT, explicit_attention_mode
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
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
    checkpoint: Path
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
        checkpoint=files.checkpoint,
        dit=open_dit(files.checkpoint, "fp32", "cpu"),  # as the torch backend serves it (fused QKV)
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
            "machine": run_context.machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": ort.__version__,
            "torch_median_s": torch_s,
            "onnxruntime_median_s": ort_s,
            "speedup_onnxruntime_over_torch": torch_s / ort_s,
        }
    )


def dit_feeds(small: SmallSetup, spec: GraphSpec) -> dict[str, np.ndarray]:
    """A batch-1 DiT call's streamed inputs, and the instruction's K/V from the bundle's text-K/V graph."""
    rng = np.random.default_rng(0)
    text_kv = open_graph(small.bundle.graph_file("dit_text_kv"), "cpu")
    return {
        "x": rng.standard_normal(spec.inputs[0].shape).astype(np.float32),
        "timesteps": np.full(spec.inputs[1].shape, 0.9, np.float32),
        "condition_mask": np.zeros(spec.inputs[2].shape, np.float32),
        **text_kv.run({"text_embedding": small.text}),
    }


def test_dit_call(benchmark: Any, small: SmallSetup) -> None:
    runner = open_graph(small.bundle.graph_file("dit_b1"), "cpu")
    feeds = dit_feeds(small, runner.spec)
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


class ProjectingDiTGraph(nn.Module):
    """The DiT graph with the instruction's embedding as its input, projecting the cross-attention K/V in every call."""

    def __init__(self, dit: CosmosDiT, spec: GraphSpec) -> None:
        super().__init__()
        self.graph = DiTGraph(dit, spec)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        text_kv = self.graph.dit.precompute_text_kv(text)
        return self.graph(x, timesteps, mask, text_kv.k, text_kv.v)


def test_text_kv_input(benchmark: Any, small: SmallSetup, tmp_path: Path) -> None:
    # pytest-benchmark times the bundle's DiT graph (K/V as constant inputs); the setup hook the projecting graph.
    runner = open_graph(small.bundle.graph_file("dit_b1"), "cpu")
    feeds = dit_feeds(small, runner.spec)
    streamed = {name: feeds[name] for name in runner.spec.input_names[:3]}
    for name in ("text_k", "text_v"):
        runner.set_constant_input(name, feeds[name])
    spec = GraphSpec(
        "dit_projecting_b1",
        (*runner.spec.inputs[:3], small.bundle.graph("dit_text_kv").spec.inputs[0]),
        runner.spec.outputs,
    )
    dit = load_dit(small.checkpoint)
    with explicit_attention_mode(dit):
        exported = export_graph(ProjectingDiTGraph(dit, spec), spec, tmp_path / "dit_projecting_b1.onnx")
    projecting = open_graph(GraphFile(spec, exported.path), "cpu")
    projecting.set_constant_input("text_embedding", small.text)
    np.testing.assert_allclose(projecting.run(streamed)["velocity"], runner.run(streamed)["velocity"], atol=1e-4)
    projecting_s = compare(benchmark, lambda: runner.run(streamed), lambda: projecting.run(streamed), ROUNDS["dit"])
    text_kv_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "workload": "small DiT graph, batch 1, 2156 tokens, onnxruntime CPU: K/V inputs vs K/V projected inside",
            "precision": "fp32",
            "machine": run_context.machine(),
            "onnxruntime": ort.__version__,
            "projecting_median_s": projecting_s,
            "text_kv_input_median_s": text_kv_s,
            "saved_fraction": 1 - text_kv_s / projecting_s,
        }
    )
