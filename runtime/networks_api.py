"""What a policy needs from its networks, independent of the engine that runs them (torch, ONNX Runtime, TensorRT).

Arrays are numpy float32 in the layouts of the official model: video "b 3 f h w" in [-1, 1], latents
"b 16 t h/8 w/8" (normalised with the Wan2.1 mean/std).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cosmos_edge.runtime.sampler import NetworkFn


class VideoAutoencoder(Protocol):
    def encode(self, video: np.ndarray) -> np.ndarray:
        """ "b 3 (1+4k) h w" → normalised latent "b 16 (1+k) h/8 w/8"."""
        ...

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """Normalised latent "b 16 (1+k) h w" → video "b 3 (1+4k) 8h 8w" in [-1, 1]."""
        ...


class DenoisingNetwork(Protocol):
    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        """The network with its text conditioning fixed to "1 l d" (cross-attention K/V computed once here)."""
        ...
