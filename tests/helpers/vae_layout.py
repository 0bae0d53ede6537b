"""The official → diffusers key map of the Wan2.1 VAE: the loader reads diffusers files with the inverse map, so tests
write diffusers-layout files (and load diffusers' reference network) with this independent direction."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from cosmos_edge.runtime.models.vae_checkpoint import _MIDDLE, _RESNET_RENAMES, _SIDE_RENAMES, _TOP_RENAMES
from cosmos_edge.runtime.models.wan_vae import WanVAEConfig


def _to_diffusers(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    for official, diffusers in renames:
        if key.startswith(official):
            return diffusers + key[len(official) :]
    return None


def official_to_diffusers_key(key: str, num_res_blocks: int) -> str:
    top = _to_diffusers(key, _TOP_RENAMES)
    if top is not None:
        return top
    side, _, rest = key.partition(".")
    if match := re.fullmatch(r"downsamples\.(\d+)\.(.+)", rest):
        block, leaf = f"down_blocks.{match[1]}.", match[2]
    elif match := re.fullmatch(r"upsamples\.(\d+)\.(.+)", rest):
        # The official decoder is one flat list: per stage num_res_blocks + 1 residual blocks, then the upsample.
        stage, position = divmod(int(match[1]), num_res_blocks + 2)
        inner = f"resnets.{position}." if position <= num_res_blocks else "upsamplers.0."
        block, leaf = f"up_blocks.{stage}.{inner}", match[2]
    elif match := re.fullmatch(r"middle\.([012])\.(.+)", rest):
        block, leaf = f"mid_block.{_MIDDLE[match[1]]}.", match[2]
    else:
        renamed = _to_diffusers(rest, _SIDE_RENAMES)
        return key if renamed is None else f"{side}.{renamed}"
    return f"{side}.{block}{_to_diffusers(leaf, _RESNET_RENAMES) or leaf}"


def to_diffusers_layout(state_dict: Mapping[str, torch.Tensor], config: WanVAEConfig) -> dict[str, torch.Tensor]:
    """Renames an official-layout state dict to diffusers' `AutoencoderKLWan` keys (tensors shared, not copied)."""
    return {official_to_diffusers_key(k, config.num_res_blocks): v for k, v in state_dict.items()}
