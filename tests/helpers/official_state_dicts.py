"""Models back to the official checkpoint layouts, as the official code saves them: the inverse of the loaders."""

from __future__ import annotations

from cosmos_edge.runtime.models.dit import CosmosDiT
from cosmos_edge.runtime.models.dit_checkpoint import OFFICIAL_PREFIX, StateDict
from cosmos_edge.runtime.models.wan_vae import WanVAE


def official_dit_state_dict(model: CosmosDiT) -> StateDict:
    """The DiT's parameters under official keys (`net.` prefix), ready for `torch.save`."""
    return {OFFICIAL_PREFIX + name: tensor for name, tensor in model.state_dict().items()}


def official_vae_state_dict(model: WanVAE) -> StateDict:
    """The VAE's weights in the official Wan layout (the layout of `tokenizer.pth`)."""
    return dict(model.state_dict())
