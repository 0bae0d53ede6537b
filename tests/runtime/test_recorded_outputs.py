"""Queries against outputs recorded before the runtime was split into layers (tests/data/recorded_queries.npz: tiny
random-weight models, seed 7, fp32 torch on the CPU).

`reference_*` is the official whole-sequence path and stays bit-identical (its actions were re-recorded once, when
the un-normalisation took the official code's float32 half of the formula: up to 1.2e-7 apart, future proprio and
value unchanged). `reactive_*` and `planning_*` were recorded
on the plain conditioning-prefix encode; the default path now encodes the always-black frames once and the rest
after them, which reorders fp32 sums inside the VAE, so it is held to the recording within FAST_PATH_TOLERANCE
(measured: 3.1e-7 at most on the actions) and must make the same planning choice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult
from tests.helpers.observations import random_observation
from tests.helpers.policies import SMALL_PLANNING

RECORDED = Path(__file__).parents[1] / "data" / "recorded_queries.npz"


FAST_PATH_TOLERANCE = 1e-5  # un-normalised actions of the tiny models' statistics (spans of 0.5 to 3)


def assert_recorded(name: str, result: ChunkResult, tolerance: float = 0.0) -> None:
    with np.load(RECORDED) as recorded:
        np.testing.assert_allclose(result.actions, recorded[f"{name}_actions"], rtol=0, atol=tolerance)
        np.testing.assert_allclose(result.future_proprio, recorded[f"{name}_future_proprio"], rtol=0, atol=tolerance)
        assert abs(result.value - float(recorded[f"{name}_value"])) <= tolerance


@pytest.mark.parametrize("platform", ["libero", "aloha"])
def test_reactive_query_stays_within_tolerance_of_the_recordings(
    tiny_assets: dict[str, CheckpointFiles], platform: str
) -> None:
    with load_policies(CheckpointSource(tiny_assets[platform])) as loaded:
        policy = loaded.reactive
        query = ActionQuery(random_observation(platform, seed=1), policy.instructions[0], seed=195, steps=3)
        result = policy.infer(query)
        assert_recorded(f"reactive_{platform}", result, FAST_PATH_TOLERANCE)
        assert_recorded(f"reference_{platform}", result, FAST_PATH_TOLERANCE)


@pytest.mark.parametrize("platform", ["libero", "aloha"])
def test_reference_query_is_bit_identical_to_the_recording(
    tiny_assets: dict[str, CheckpointFiles], platform: str
) -> None:
    with load_policies(CheckpointSource(tiny_assets[platform], encode_full_sequence=True)) as loaded:
        policy = loaded.reactive
        query = ActionQuery(random_observation(platform, seed=1), policy.instructions[0], seed=195, steps=3)
        assert_recorded(f"reference_{platform}", policy.infer(query))


def test_planning_query_makes_the_recorded_choice(tiny_assets: dict[str, CheckpointFiles]) -> None:
    with load_policies(CheckpointSource(tiny_assets["aloha"]), planning=SMALL_PLANNING) as loaded:
        assert loaded.planning is not None
        query = ActionQuery(random_observation("aloha", seed=2), "fold the t-shirt", seed=10, steps=1)
        assert_recorded("planning_aloha", loaded.planning.infer(query), FAST_PATH_TOLERANCE)
