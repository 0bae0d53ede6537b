"""The conditioning prefix's encoder: every clip opens with the same black frames, so they are encoded once.

Used by the torch backend (compiled, replayed from CUDA graphs) and exported as the bundles' `vae_encoder_cameras`
graph, where the black latent and the causal context become constants of the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cosmos_edge.runtime.models.wan_vae import WanVAE
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec
from cosmos_edge.runtime.policy.latents import BLACK, black_prefix_frames


class BlackPrefixEncoder(nn.Module):
    """Camera frames [B, 3, 4k, 224, 224] in the VAE's dtype → the latents of the whole prefix, black frames first,
    as encoding the whole clip would give them (the encoder is causal: bf16 bit-identical with the 3-D convs; folded,
    the same sums in another order). `fold_time_taps`: see
    `CausalContext`."""

    black_latent: Tensor

    def __init__(self, vae: WanVAE, platform: PlatformSpec, fold_time_taps: bool = False) -> None:
        super().__init__()
        self.vae = vae
        constant = vae.latent_mean
        shape = (1, 3, black_prefix_frames(platform), IMAGE_SIZE, IMAGE_SIZE)
        black = torch.full(shape, float(BLACK), dtype=constant.dtype, device=constant.device)
        with torch.no_grad():
            black_latent, self.context = vae.encode_prefix(black, fold_time_taps)
        self.register_buffer("black_latent", black_latent)

    def forward(self, cameras: Tensor) -> Tensor:
        continuation = self.vae.encode_continuation(cameras, self.context)
        black = self.black_latent.expand(continuation.shape[0], -1, -1, -1, -1)  # one black prefix for every sample
        return torch.cat([black, continuation], dim=2)
