"""The I/O of every exported graph, declared once: export, backends, buffers, sample inputs and the manifest derive
from these tables.

Every graph takes and returns float32 at its boundary; its internal precision is the bundle's (fp32, fp16, bf16),
cast inside the graph, so callers and buffers never depend on the precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.platforms import IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE, PlatformSpec


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def _latent(batch: int, frames: int) -> tuple[int, ...]:
    return (batch, LATENT_CHANNELS, frames, LATENT_SIZE, LATENT_SIZE)


def dit_graph(platform: PlatformSpec, batch: int, text_tokens: int, text_dim: int, prefix: str = "dit") -> GraphSpec:
    """One network evaluation for `batch` candidates; all candidates share one instruction ("1 l d")."""
    frames = platform.num_latent_frames
    return GraphSpec(
        name=f"{prefix}_b{batch}",
        inputs=(
            TensorSpec("x", _latent(batch, frames)),
            TensorSpec("timesteps", (batch, frames)),
            TensorSpec("condition_mask", (batch, 1, frames, LATENT_SIZE, LATENT_SIZE)),
            TensorSpec("text_embedding", (1, text_tokens, text_dim)),
        ),
        outputs=(TensorSpec("velocity", _latent(batch, frames)),),
    )


def vae_encoder_graph(platform: PlatformSpec, full_sequence: bool) -> GraphSpec:
    """The conditioning prefix (reactive path) or the whole sequence (needed to decode future images)."""
    frames = platform.num_latent_frames if full_sequence else platform.num_conditional_frames
    pixel_frames = 1 + 4 * (frames - 1)
    return GraphSpec(
        name="vae_encoder_full" if full_sequence else "vae_encoder_prefix",
        inputs=(TensorSpec("video", (1, 3, pixel_frames, IMAGE_SIZE, IMAGE_SIZE)),),
        outputs=(TensorSpec("latent", _latent(1, frames)),),
    )


def vae_decoder_graph(platform: PlatformSpec) -> GraphSpec:
    return GraphSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", _latent(1, platform.num_latent_frames)),),
        outputs=(TensorSpec("video", (1, 3, platform.num_pixel_frames, IMAGE_SIZE, IMAGE_SIZE)),),
    )
