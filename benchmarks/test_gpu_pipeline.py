"""Per-stage latency of the full-size model (Cosmos-Predict2-2B DiT + Wan2.1 VAE, random weights) on a CUDA GPU,
torch eager, bf16, ALOHA layout (11 latent frames, 2156 tokens).

Baseline against the official serving path, measured in the same run:
- `reference`: the official query semantics as the official server runs them: the whole 41-frame sequence goes
  through the VAE, and the text cross-attention K/V are recomputed on every network call;
- `fast`: the default path, eager: the 12 camera frames after the black frames encoded once at load, the image
  transforms and the sampler on the device, the K/V computed once per instruction (the H100 run recorded in
  `results/gpu_pipeline_h100.json` predates the black frames' cache: it encoded the whole 17-frame prefix);
- `fast+compile`: `fast` with the DiT under `torch.compile` (inductor's fused kernels).
All use this repository's networks (static VAE), so the ratios isolate those changes.

Run on a GPU machine:
`python -m pytest benchmarks/test_gpu_pipeline.py --benchmark-enable --benchmark-json benchmarks/results/gpu.json`
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from cosmos_edge.runtime.engines.torch_networks import TorchAutoencoder, TorchDiT
from cosmos_edge.runtime.models.dit import CosmosDiT
from cosmos_edge.runtime.models.dit_checkpoint import dit_from_state_dict, random_dit_state_dict
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.models.random_assets import random_stats
from cosmos_edge.runtime.models.vae_checkpoint import random_vae_state_dict
from cosmos_edge.runtime.models.wan_vae import WanVAE, vae_config
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, DenoisingNetwork, NetworkFn, Observation, Policy
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from cosmos_edge.runtime.policy.steps import PolicyModel
from cosmos_edge.runtime.policy.text_embeddings import TextEmbeddings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ALOHA = platform_spec("aloha")
INSTRUCTION = "fold the t-shirt"
DEVICE = torch.device("cuda")


class TextPerCallDiT:
    """The official serving path: cross-attention K/V projected from the text on every network call."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self._dit = dit

    @torch.inference_mode()
    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        text = torch.from_numpy(text_embedding).to(DEVICE, torch.bfloat16)

        @torch.inference_mode()
        def network(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
            def tensor(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(array)).to(DEVICE, torch.bfloat16)

            return self._dit(tensor(x), tensor(timesteps), tensor(condition_mask), text).float().cpu().numpy()

        return network


@dataclass(frozen=True)
class Models:
    dit: CosmosDiT
    vae: WanVAE
    text: TextEmbeddings


@pytest.fixture(scope="module")
def models() -> Models:
    config = dit_config("predict2-2b")
    dit = dit_from_state_dict(random_dit_state_dict(config, 0, torch.bfloat16), dtype=torch.bfloat16, device=DEVICE)
    vae = WanVAE(vae_config("wan2.1"))
    vae.load_state_dict(random_vae_state_dict(vae_config("wan2.1"), 1))
    vae = vae.to(DEVICE, torch.bfloat16).eval()
    embedding = np.random.default_rng(2).standard_normal((1, 512, config.text_dim)).astype(np.float32)
    return Models(dit.eval(), vae, TextEmbeddings.from_arrays({INSTRUCTION: embedding}))


def observation() -> Observation:
    rng = np.random.default_rng(3)
    images = {name: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for name in ALOHA.cameras}
    return Observation(images, rng.uniform(-0.2, 0.2, ALOHA.proprio_dim).astype(np.float32))


def policy_model(models: Models) -> PolicyModel:
    autoencoder = TorchAutoencoder(models.vae, DEVICE, ALOHA)
    return PolicyModel(ALOHA, random_stats(ALOHA, 0), models.text, autoencoder, autoencoder)


def make_policy(models: Models, network: DenoisingNetwork, full_sequence: bool) -> ReactivePolicy:
    return ReactivePolicy(policy_model(models), network, encode_full_sequence=full_sequence)


def run_query(policy: Policy, steps: int) -> Callable[[], object]:
    query = ActionQuery(observation(), INSTRUCTION, seed=195, steps=steps)
    policy.infer(query)  # warm-up: kernels, RoPE tables, text K/V
    return lambda: policy.infer(query)


@pytest.mark.parametrize("steps", [1, 10])
def test_query_reference(benchmark, models: Models, steps: int) -> None:  # type: ignore[no-untyped-def]
    policy = make_policy(models, TextPerCallDiT(models.dit), full_sequence=True)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", path="reference")
    benchmark.pedantic(run_query(policy, steps), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("steps", [1, 10])
def test_query_fast(benchmark, models: Models, steps: int) -> None:  # type: ignore[no-untyped-def]
    policy = make_policy(models, TorchDiT(models.dit, DEVICE), full_sequence=False)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", path="fast")
    timed = run_query(policy, steps)
    benchmark.pedantic(timed, rounds=10, warmup_rounds=1)
    result = timed()  # a warm query's stages (the first one's include the warm-up's costs)
    assert isinstance(result, ChunkResult)
    benchmark.extra_info.update({f"stage_ms_{k}": v for k, v in result.timings_ms.items()})


@pytest.mark.parametrize("steps", [1, 10])
def test_query_fast_compiled(benchmark, models: Models, steps: int) -> None:  # type: ignore[no-untyped-def]
    policy = make_policy(models, TorchDiT(models.dit, DEVICE, compile_mode="default"), full_sequence=False)
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", path="fast+compile")
    benchmark.pedantic(run_query(policy, steps), rounds=10, warmup_rounds=1)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("batch", [1, 8])
def test_dit_forward(benchmark, models: Models, batch: int, compiled: bool) -> None:  # type: ignore[no-untyped-def]
    frames = ALOHA.num_latent_frames
    x = torch.randn(batch, 16, frames, 28, 28, device=DEVICE, dtype=torch.bfloat16)
    t = torch.full((batch, frames), 0.98, device=DEVICE, dtype=torch.bfloat16)
    mask = torch.zeros(batch, 1, frames, 28, 28, device=DEVICE, dtype=torch.bfloat16)
    kv = models.dit.precompute_text_kv(torch.randn(1, 512, 1024, device=DEVICE))

    network = torch.compile(models.dit, mode="default", dynamic=False) if compiled else models.dit

    @torch.inference_mode()
    def forward() -> None:
        network(x, t, mask, kv)
        torch.cuda.synchronize()

    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", batch=batch, compiled=compiled)
    benchmark.pedantic(forward, rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("pixel_frames", [17, ALOHA.num_pixel_frames])  # the conditioning prefix, the clip
def test_vae_encode(benchmark, models: Models, pixel_frames: int) -> None:  # type: ignore[no-untyped-def]
    video = torch.zeros(1, 3, pixel_frames, 224, 224, device=DEVICE, dtype=torch.bfloat16)

    @torch.inference_mode()
    def encode() -> None:
        models.vae.encode(video)
        torch.cuda.synchronize()

    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", pixel_frames=pixel_frames)
    benchmark.pedantic(encode, rounds=10, warmup_rounds=2)


def test_planning_best_of_8_one_gpu(benchmark, models: Models) -> None:  # type: ignore[no-untyped-def]
    """The official ALOHA planning command (8 candidates, 10 action steps, futures [1, 3, 5], values [1..5] each,
    majority_mean) on one GPU, compiled DiT; the policy and planning models share weights here."""
    from cosmos_edge.runtime.policy.planning import DeviceNetworks, PlanningPolicy
    from cosmos_edge.runtime.policy.planning_config import PlanningConfig

    dit = TorchDiT(models.dit, DEVICE, compile_mode="default")
    planner = PlanningPolicy(policy_model(models), [DeviceNetworks(dit, dit)], PlanningConfig(num_queries_best_of_n=8))
    benchmark.extra_info.update(device=torch.cuda.get_device_name(), precision="bf16", candidates=8, gpus=1)
    benchmark.pedantic(run_query(planner, 10), rounds=3, warmup_rounds=0)
    planner.close()
