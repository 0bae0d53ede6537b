"""Reactive and planning queries give exactly the outputs recorded before the runtime was split into layers
(tests/data/recorded_queries.npz: tiny random-weight models, seed 7, fp32 torch on the CPU). `reference_*`: the
official whole-sequence path; `reactive_*` and `planning_*`: the conditioning-prefix path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointFiles, CheckpointSource
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult
from cosmos_edge.runtime.policy.planning import PlanningConfig
from tests.helpers.observations import random_observation

RECORDED = Path(__file__).parents[1] / "data" / "recorded_queries.npz"


def assert_recorded(name: str, result: ChunkResult) -> None:
    with np.load(RECORDED) as recorded:
        np.testing.assert_array_equal(result.actions, recorded[f"{name}_actions"])
        np.testing.assert_array_equal(result.future_proprio, recorded[f"{name}_future_proprio"])
        assert np.float32(result.value) == recorded[f"{name}_value"]


@pytest.mark.parametrize("platform", ["libero", "aloha"])
def test_reactive_query_is_bit_identical_to_the_recording(
    tiny_assets: dict[str, CheckpointFiles], platform: str
) -> None:
    with load_policies(CheckpointSource(tiny_assets[platform])) as loaded:
        policy = loaded.reactive
        query = ActionQuery(random_observation(platform, seed=1), policy.instructions[0], seed=195, steps=3)
        assert_recorded(f"reactive_{platform}", policy.infer(query))


@pytest.mark.parametrize("platform", ["libero", "aloha"])
def test_reference_query_is_bit_identical_to_the_recording(
    tiny_assets: dict[str, CheckpointFiles], platform: str
) -> None:
    with load_policies(CheckpointSource(tiny_assets[platform], encode_full_sequence=True)) as loaded:
        policy = loaded.reactive
        query = ActionQuery(random_observation(platform, seed=1), policy.instructions[0], seed=195, steps=3)
        assert_recorded(f"reference_{platform}", policy.infer(query))


def test_planning_query_is_bit_identical_to_the_recording(tiny_assets: dict[str, CheckpointFiles]) -> None:
    config = PlanningConfig(num_candidates=3, future_steps=(1, 3), value_steps=(1, 2))
    with load_policies(CheckpointSource(tiny_assets["aloha"]), planning=config) as loaded:
        assert loaded.planning is not None
        query = ActionQuery(random_observation("aloha", seed=2), "fold the t-shirt", seed=10, steps=1)
        assert_recorded("planning_aloha", loaded.planning.infer(query))
