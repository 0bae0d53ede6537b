"""The torch backend: eager (or `torch.compile`d) PyTorch networks behind the policy's network interfaces, opened
from official checkpoint files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.models.dit import CosmosDiT
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.models.wan_vae import WanVAE
from cosmos_edge.runtime.policy.api import NetworkFn


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


def check_device(device: str) -> torch.device:
    """`device` as a torch device this process can use; ConfigError names the device otherwise."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"device {device!r}: not a torch device; expected cpu, cuda or cuda:N") from error
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} but sees no GPU"
            raise ConfigError(f"device {device!r}: this torch ({torch.__version__}) is {build}; use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif torch_device.type != "cpu":
        raise ConfigError(f"device {device!r}: the torch backend runs on cpu or cuda[:N]")
    return torch_device


def open_autoencoder(tokenizer: Path, precision: str, device: str) -> TorchAutoencoder:
    """The Wan2.1 VAE of a `tokenizer.pth` (or diffusers `vae/` directory) on `device`."""
    torch_device = check_device(device)
    return TorchAutoencoder(load_wan_vae(tokenizer, TORCH_DTYPES[precision], torch_device), torch_device)


def open_denoiser(checkpoint: Path, precision: str, device: str, compile_mode: str | None = None) -> TorchDiT:
    """The DiT of an official `.pt` (or diffusers `transformer/` directory) on `device`."""
    torch_device = check_device(device)
    return TorchDiT(load_dit(checkpoint, TORCH_DTYPES[precision], torch_device), torch_device, compile_mode)
