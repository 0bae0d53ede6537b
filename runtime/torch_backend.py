"""Eager PyTorch networks behind `networks_api`, and the reference policy built on them from official files."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from cosmos_edge.runtime import text_embeddings as text_store
from cosmos_edge.runtime.bundle import PRECISIONS
from cosmos_edge.runtime.cosmos_policy import CosmosPolicy, PolicyOptions
from cosmos_edge.runtime.dit import CosmosDiT
from cosmos_edge.runtime.dit_checkpoint import load_dit
from cosmos_edge.runtime.normalization import DatasetStats
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.sampler import NetworkFn
from cosmos_edge.runtime.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.wan_vae import WanVAE

# The precision names of the CLI and the bundle manifest → torch dtypes.
TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    dict(zip(PRECISIONS, (torch.float32, torch.float16, torch.bfloat16), strict=True))
)


class TorchAutoencoder:
    def __init__(self, vae: WanVAE, device: torch.device) -> None:
        self._vae = vae.eval()
        self._device = device
        self._dtype = next(vae.parameters()).dtype

    @torch.inference_mode()
    def encode(self, video: np.ndarray) -> np.ndarray:
        return self._vae.encode(self._tensor(video)).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, latent: np.ndarray) -> np.ndarray:
        return self._vae.decode(self._tensor(latent)).float().cpu().numpy()

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self._device, self._dtype)


class TorchDiT:
    """`compile_mode`: None runs eager; otherwise a `torch.compile` mode (e.g. "default", "max-autotune") for the
    fixed-shape forward, whose fused kernels are checked against eager in tests/runtime/test_torch_backend.py."""

    def __init__(self, dit: CosmosDiT, device: torch.device, compile_mode: str | None = None) -> None:
        self._dit = dit.eval()
        self._device = device
        self._forward = torch.compile(self._dit, mode=compile_mode, dynamic=False) if compile_mode else self._dit

    @torch.inference_mode()
    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        kv = self._dit.precompute_text_kv(torch.from_numpy(text_embedding).to(self._device))

        @torch.inference_mode()
        def network(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
            def tensor(array: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(array)).to(self._device, self._dit.dtype)

            return self._forward(tensor(x), tensor(timesteps), tensor(condition_mask), kv).float().cpu().numpy()

        return network


@dataclass(frozen=True)
class PolicyFiles:
    """The official files one policy needs."""

    checkpoint: Path
    tokenizer: Path
    stats: Path
    text_embeddings: Path
    platform: str


def load_torch_policy(
    files: PolicyFiles,
    precision: str = "fp32",
    device: str = "cpu",
    options: PolicyOptions | None = None,
    compile_mode: str | None = None,
) -> CosmosPolicy:
    """The reference policy: eager torch networks loaded from official checkpoint files (`compile_mode`: see
    `TorchDiT`)."""
    platform = platform_spec(files.platform)
    dtype = TORCH_DTYPES[precision]
    torch_device = torch.device(device)
    return CosmosPolicy(
        platform=platform,
        stats=DatasetStats.from_json(files.stats, platform),
        text_embeddings=text_store.read(files.text_embeddings),
        autoencoder=TorchAutoencoder(load_wan_vae(files.tokenizer, dtype, torch_device), torch_device),
        network=TorchDiT(load_dit(files.checkpoint, dtype, torch_device), torch_device, compile_mode),
        options=options or PolicyOptions(),
    )
