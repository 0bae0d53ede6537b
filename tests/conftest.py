"""Shared fixtures: random-weight tiny models in the official file formats, one per platform, and tiny bundles
exported from them (once per session and kind)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets
from tests.helpers.observations import TinyBundles


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CheckpointFiles]:
    root: Path = tmp_path_factory.mktemp("tiny_assets")
    return {
        name: write_random_assets(root / name, RandomAssetsSpec("tiny", name, seed=7))
        for name in ("libero", "robocasa", "aloha")
    }


@pytest.fixture(scope="session")
def tiny_bundles(tiny_assets: dict[str, CheckpointFiles], tmp_path_factory: pytest.TempPathFactory) -> TinyBundles:
    """`tiny_bundles(platform, precision="fp32", future_images=False, batch_sizes=(1, 2))` -> a bundle with those DiT
    batch sizes, exported on first request and shared by every later test (bundles must not be modified: copy them)."""
    from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle

    root = tmp_path_factory.mktemp("tiny_bundles")
    cache: dict[tuple[str, str, bool, tuple[int, ...]], Path] = {}

    def get(
        platform: str, precision: str = "fp32", future_images: bool = False, batch_sizes: tuple[int, ...] = (1, 2)
    ) -> Path:
        key = (platform, precision, future_images, batch_sizes)
        if key not in cache:
            files = tiny_assets[platform]
            sizes = "_".join(map(str, batch_sizes))
            out = root / f"{platform}_{precision}{'_future' if future_images else ''}_b{sizes}"
            request = ExportRequest(
                files.checkpoint,
                files.tokenizer,
                files.stats,
                files.text_embeddings,
                platform,
                out,
                batch_sizes=batch_sizes,
                precision=precision,
                future_images=future_images,
            )
            cache[key] = export_bundle(request).root
        return cache[key]

    return get
