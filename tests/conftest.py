"""Shared fixtures: random-weight tiny models in the official file formats, one per platform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.runtime.platforms import PlatformSpec, platform_spec
from cosmos_edge.runtime.policy_api import Observation
from cosmos_edge.runtime.random_assets import RandomAssetsSpec, write_random_assets
from cosmos_edge.runtime.torch_backend import PolicyFiles


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PolicyFiles]:
    root: Path = tmp_path_factory.mktemp("tiny_assets")
    return {
        name: write_random_assets(root / name, RandomAssetsSpec("tiny", name, seed=7))
        for name in ("libero", "robocasa", "aloha")
    }


def random_observation(platform: PlatformSpec | str, seed: int = 0, height: int = 240, width: int = 320) -> Observation:
    """Camera frames of a size the platform's preprocessing resizes, and proprio inside typical stats ranges."""
    spec = platform_spec(platform) if isinstance(platform, str) else platform
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for name in spec.cameras}
    return Observation(images=images, proprio=rng.uniform(-0.2, 0.2, spec.proprio_dim).astype(np.float32))
