"""Random observations of a platform's shape, and the type of the `tiny_bundles` fixture."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from cosmos_edge.runtime.platforms import PlatformSpec, platform_spec
from cosmos_edge.runtime.policy.api import Observation

TinyBundles = Callable[..., Path]
"""`tiny_bundles(platform, precision="fp32", future_images=False, batch_sizes=(1, 2))` -> a shared tiny bundle."""


def random_observation(platform: PlatformSpec | str, seed: int = 0, height: int = 240, width: int = 320) -> Observation:
    """Camera frames of a size the platform's preprocessing resizes, and proprio inside typical stats ranges."""
    spec = platform_spec(platform) if isinstance(platform, str) else platform
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for name in spec.cameras}
    return Observation(images=images, proprio=rng.uniform(-0.2, 0.2, spec.proprio_dim).astype(np.float32))
