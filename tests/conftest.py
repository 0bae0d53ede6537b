"""Shared fixtures: random-weight tiny models in the official file formats, one per platform, and tiny bundles
exported from them (once per session and kind)."""

from __future__ import annotations

from collections.abc import Callable
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


TinyBundles = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_bundles(tiny_assets: dict[str, PolicyFiles], tmp_path_factory: pytest.TempPathFactory) -> TinyBundles:
    """`tiny_bundles(platform, precision="fp32", future_images=False)` -> a bundle with DiT batch sizes 1 and 2,
    exported on first request and shared by every later test (bundles must not be modified: copy them)."""
    from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle

    root = tmp_path_factory.mktemp("tiny_bundles")
    cache: dict[tuple[str, str, bool], Path] = {}

    def get(platform: str, precision: str = "fp32", future_images: bool = False) -> Path:
        key = (platform, precision, future_images)
        if key not in cache:
            files = tiny_assets[platform]
            out = root / f"{platform}_{precision}{'_future' if future_images else ''}"
            request = ExportRequest(
                files.checkpoint,
                files.tokenizer,
                files.stats,
                files.text_embeddings,
                platform,
                out,
                batch_sizes=(1, 2),
                precision=precision,
                future_images=future_images,
            )
            cache[key] = export_bundle(request).root
        return cache[key]

    return get
