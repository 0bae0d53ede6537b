"""Action error of fp16 and bf16 bundles against the fp32 reference policy: `tiny` config, random weights, every
platform, each platform's default number of denoising steps, same seeds.

- fp32, fp16: the exported bundle on ONNX Runtime's CPU provider.
- bf16: ONNX Runtime's CPU provider has no bfloat16 kernels, so the computation of the bf16 graphs is run by torch
  instead: the export wrappers (`DiTGraph` in explicit-attention mode, `VAECamerasEncoderGraph`) in the precisions a
  bf16 bundle exports them (the DiT in bf16, the VAE in fp32), i.e. the very functions the exporter traces, on
  torch's CPU kernels (fp32 accumulation, as TensorRT's).

Error: max abs difference of the normalised actions (the model's [-1, 1] units) over the chunk, and of the value.
Random tiny weights show the size of the precision effect through this pipeline, not the released checkpoints'.

Run: `.venv/bin/python -m benchmarks.precision_error --out benchmarks/results/precision_error.json`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks import run_context
from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle
from cosmos_edge.export.onnx_export import DiTGraph, TextKVGraph, VAECamerasEncoderGraph
from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource
from cosmos_edge.runtime.engines.graph import GraphSpec, dit_graph, text_kv_graph, vae_encoder_graph
from cosmos_edge.runtime.engines.graph_networks import GraphAutoencoder, GraphConditioning, GraphDenoisingNetwork
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.dit import explicit_attention_mode
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, Observation, Policy
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from cosmos_edge.runtime.policy.steps import PolicyModel
from cosmos_edge.runtime.precision import vae_graph_precision

PLATFORMS = ("libero", "robocasa", "aloha")
OBSERVATIONS = 2


class TorchGraphRunner:
    """A GraphRunner executing an export wrapper module with torch: the graph's computation without ONNX."""

    def __init__(self, module: nn.Module, spec: GraphSpec) -> None:
        self._module = module.eval()
        self._spec = spec
        self._constants: dict[str, np.ndarray] = {}

    @property
    def spec(self) -> GraphSpec:
        return self._spec

    def set_constant_input(self, name: str, array: np.ndarray) -> None:
        self._constants[name] = array

    @torch.inference_mode()
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {**self._constants, **inputs}
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name], np.float32)) for name in self._spec.input_names]
        outputs = self._module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: output.numpy() for name, output in zip(self._spec.output_names, outputs, strict=True)}

    def close(self) -> None:
        pass


def bf16_graph_policy(files: CheckpointFiles) -> tuple[ReactivePolicy, nn.Module]:
    """The policy on the bf16 graphs' computation, and its DiT (to be run in explicit-attention mode)."""
    platform = platform_spec(files.platform)
    texts = text_store.read(files.text_embeddings)
    _, tokens, dim = texts.shape
    dit = load_dit(files.checkpoint, torch.bfloat16)
    text_kv_spec = text_kv_graph(tokens, dim, dit.config.text_kv_shape(tokens))
    dit_spec = dit_graph(platform, 1, dit.config.text_kv_shape(tokens))
    encoder_spec = vae_encoder_graph(platform, full_sequence=False)
    vae = load_wan_vae(files.tokenizer, TORCH_DTYPES[vae_graph_precision("bf16")])  # as a bf16 bundle's
    encoder = VAECamerasEncoderGraph(vae, platform)
    conditioning = GraphConditioning(platform, TorchGraphRunner(encoder, encoder_spec))
    autoencoder = GraphAutoencoder(None, None)
    model = PolicyModel(platform, DatasetStats.from_json(files.stats, platform), texts, autoencoder, conditioning)
    text_kv = TorchGraphRunner(TextKVGraph(dit), text_kv_spec)
    policy = ReactivePolicy(
        model, GraphDenoisingNetwork(text_kv, [TorchGraphRunner(DiTGraph(dit, dit_spec), dit_spec)])
    )
    return policy, dit


def observation(platform: str, seed: int) -> Observation:
    spec = platform_spec(platform)
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for name in spec.cameras}
    return Observation(images, rng.uniform(-0.2, 0.2, spec.proprio_dim).astype(np.float32))


def errors(stats: DatasetStats, got: ChunkResult, expected: ChunkResult) -> tuple[float, float]:
    span = stats.actions_max - stats.actions_min
    action = float(np.abs(2.0 * (got.actions - expected.actions) / span).max())
    return action, abs(got.value - expected.value)


def measure(platform: str, root: Path) -> dict[str, dict[str, float]]:
    with contextlib.ExitStack() as loaded:
        return _measure(platform, root, loaded)


def _measure(platform: str, root: Path, loaded: contextlib.ExitStack) -> dict[str, dict[str, float]]:
    """The worst errors of each candidate policy; every policy loaded stays open in `loaded`."""
    files = write_random_assets(root / platform, RandomAssetsSpec("tiny", platform, seed=7))
    reference = loaded.enter_context(load_policies(CheckpointSource(files, encode_full_sequence=True))).reactive
    candidates: dict[str, Policy] = {}
    for precision in ("fp32", "fp16"):
        out = root / f"{platform}_{precision}"
        export_bundle(
            ExportRequest(
                files.checkpoint,
                files.tokenizer,
                files.stats,
                files.text_embeddings,
                platform,
                out,
                precision=precision,
                future_images=False,
            )
        )
        candidates[f"{precision} onnxruntime-cpu"] = loaded.enter_context(load_policies(BundleSource(out))).reactive
    candidates["bf16 graph computation, torch-cpu"], bf16_dit = bf16_graph_policy(files)
    worst = {name: {"max_action_error": 0.0, "max_value_error": 0.0} for name in candidates}
    with explicit_attention_mode(bf16_dit):
        for seed in range(OBSERVATIONS):
            query = ActionQuery(observation(platform, seed), reference.instructions[0], seed=195 + seed)
            expected = reference.infer(query)
            for name, policy in candidates.items():
                action, value = errors(reference.model.stats, policy.infer(query), expected)
                worst[name]["max_action_error"] = max(worst[name]["max_action_error"], action)
                worst[name]["max_value_error"] = max(worst[name]["max_value_error"], value)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON file to write the results to")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as scratch:
        results = {
            platform: {"steps": platform_spec(platform).default_action_steps, **measure(platform, Path(scratch))}
            for platform in PLATFORMS
        }
    context = {
        "command": "python -m benchmarks.precision_error " + " ".join(sys.argv[1:]),
        "machine": f"{run_context.machine()}; torch {torch.__version__}",
        "commit": run_context.commit(),
        "backends": "fp32/fp16: onnxruntime CPU provider; bf16: torch CPU (DiT bf16, VAE fp32, as a bf16 bundle)",
        "baseline": "the fp32 reference policy (torch CPU, official whole-sequence path), same process and seeds",
    }
    text = json.dumps({**context, "config": "tiny", "observations": OBSERVATIONS, "results": results}, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
