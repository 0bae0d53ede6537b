"""A whole query through a tiny bundle on ONNX Runtime against the reference torch policy: same seed, same steps."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pytest

from cosmos_edge.runtime.backends import load_backend
from cosmos_edge.runtime.bundle import Bundle
from cosmos_edge.runtime.bundle_policy import load_bundle_policy, open_bundle_networks
from cosmos_edge.runtime.cosmos_policy import CosmosPolicy, PolicyOptions
from cosmos_edge.runtime.normalization import DatasetStats
from cosmos_edge.runtime.policy_api import ActionQuery, ChunkResult
from cosmos_edge.runtime.torch_backend import PolicyFiles, load_torch_policy
from tests.conftest import TinyBundles, random_observation

ACTION_TOL = 1e-3  # max abs error of the normalised actions at fp32 (issue 4)


def normalised_actions(stats: DatasetStats, actions: np.ndarray) -> np.ndarray:
    """Inverse of `unnormalize_actions`: back to the [-1, 1] units the model predicts in."""
    span = np.where(stats.actions_max > stats.actions_min, stats.actions_max - stats.actions_min, 1.0)
    return 2.0 * (actions - stats.actions_min) / span - 1.0


def action_error(stats: DatasetStats, got: ChunkResult, expected: ChunkResult) -> float:
    return float(np.abs(normalised_actions(stats, got.actions) - normalised_actions(stats, expected.actions)).max())


# Steps per platform: aloha runs the multi-step solver (3 network calls), the others the single call.
STEPS = {"libero": 1, "robocasa": 1, "aloha": 3}


def query(policy: CosmosPolicy, **overrides: object) -> ActionQuery:
    name = policy.platform.name
    base = ActionQuery(random_observation(name, seed=5), policy.instructions[0], seed=195, steps=STEPS[name])
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def references(tiny_assets: dict[str, PolicyFiles]) -> Callable[[str], tuple[DatasetStats, ChunkResult]]:
    """The reference policy's result for `query`, computed once per platform for every test here.

    ALOHA's reference encodes the whole sequence as the official code does; LIBERO's and RoboCasa's encode the
    conditioning prefix, which gives the same latents (tests/runtime/test_cosmos_policy.py) at half the cost.
    """
    cache: dict[str, tuple[DatasetStats, ChunkResult]] = {}

    def get(platform: str) -> tuple[DatasetStats, ChunkResult]:
        if platform not in cache:
            options = PolicyOptions(encode_full_sequence=platform == "aloha")
            reference = load_torch_policy(tiny_assets[platform], options=options)
            cache[platform] = (reference.stats, reference.infer(query(reference)))
        return cache[platform]

    return get


@pytest.mark.parametrize("platform", ["libero", "robocasa", "aloha"])
def test_bundle_query_matches_the_reference_policy(
    platform: str, tiny_bundles: TinyBundles, references: Callable[[str], tuple[DatasetStats, ChunkResult]]
) -> None:
    bundle_policy = load_bundle_policy(tiny_bundles(platform), "onnxruntime", platform)
    got = bundle_policy.infer(query(bundle_policy))
    stats, expected = references(platform)
    assert got.actions.shape == expected.actions.shape
    assert action_error(stats, got, expected) <= ACTION_TOL
    assert got.value == pytest.approx(expected.value, abs=ACTION_TOL)
    np.testing.assert_allclose(got.future_proprio, expected.future_proprio, rtol=0, atol=ACTION_TOL * 3)
    assert {"vae_encode", "dit", "readout"} <= set(got.timings_ms)


def test_batched_dit_graph_equals_one_call_per_candidate(tiny_bundles: TinyBundles) -> None:
    bundle = Bundle.open(tiny_bundles("aloha"))
    with open_bundle_networks(bundle, load_backend("onnxruntime"), batch_sizes=(1, 2)) as networks:
        network = networks.network.bind_text(bundle.text_embeddings().get(bundle.text_embeddings().instructions[0]))
        rng = np.random.default_rng(0)
        x = rng.standard_normal((2, 16, 11, 28, 28)).astype(np.float32)
        timesteps = np.full((2, 11), 0.9, np.float32)
        mask = np.zeros((2, 1, 11, 28, 28), np.float32)
        batched = network(x, timesteps, mask)
        single = np.concatenate([network(x[i : i + 1], timesteps[i : i + 1], mask[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


def test_half_precision_bundle_stays_close(
    tiny_bundles: TinyBundles, references: Callable[[str], tuple[DatasetStats, ChunkResult]]
) -> None:
    # fp16 runs on onnxruntime's CPU provider (bf16 does not; benchmarks/precision_error.py measures both).
    bundle_policy = load_bundle_policy(tiny_bundles("aloha", "fp16"))
    stats, expected = references("aloha")
    assert 0 < action_error(stats, bundle_policy.infer(query(bundle_policy)), expected) <= 0.05


@pytest.mark.slow
def test_future_images_match_the_reference(tiny_bundles: TinyBundles, tiny_assets: dict[str, PolicyFiles]) -> None:
    bundle_policy = load_bundle_policy(tiny_bundles("aloha", future_images=True), future_images=True)
    reference = load_torch_policy(tiny_assets["aloha"])
    got = bundle_policy.infer(query(bundle_policy, return_future_images=True, steps=1))
    expected = reference.infer(query(reference, return_future_images=True, steps=1))
    assert action_error(reference.stats, got, expected) <= ACTION_TOL
    assert got.future_images is not None and expected.future_images is not None
    for camera, image in expected.future_images.items():
        # uint8 pixels: fp32 differences only flip values sitting on a rounding boundary, by one level.
        assert np.abs(got.future_images[camera].astype(int) - image).max() <= 1, camera


SERVE_WITHOUT_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: serving a bundle must not import torch")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
from cosmos_edge.runtime.bundle_policy import load_bundle_policy
from cosmos_edge.runtime.policy_api import ActionQuery, Observation

policy = load_bundle_policy(sys.argv[1], "onnxruntime")
rng = np.random.default_rng(0)
images = {name: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for name in policy.platform.cameras}
observation = Observation(images, np.zeros(policy.platform.proprio_dim, np.float32))
result = policy.infer(ActionQuery(observation, policy.instructions[0], seed=1, steps=1))
assert np.isfinite(result.actions).all()
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules), "torch was imported"
print("served without torch")
"""


def test_serving_a_bundle_never_imports_torch(tiny_bundles: TinyBundles) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(tiny_bundles("libero"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "served without torch" in result.stdout, result.stderr
