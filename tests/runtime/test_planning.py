"""Best-of-N planning at `tiny`: the chosen chunk is a reactive chunk of one candidate, and the split of the
candidates over workers does not change the choice."""

from __future__ import annotations

import contextlib
import dataclasses
import logging

import numpy as np
import pytest

from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.engines.torch_networks import TorchAutoencoder
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy import candidate_search
from cosmos_edge.runtime.policy.api import ActionQuery
from cosmos_edge.runtime.policy.planning import PlanningPolicy
from cosmos_edge.runtime.policy.planning_config import PlanningConfig
from tests.helpers.observations import random_observation
from tests.helpers.policies import SMALL_PLANNING, reference_policy

CONFIG = SMALL_PLANNING


def make_planner(files: CheckpointFiles, num_workers: int) -> PlanningPolicy:
    loaded = load_policies(CheckpointSource(files), devices=["cpu"] * num_workers, planning=CONFIG)
    assert loaded.planning is not None
    return loaded.planning


@pytest.fixture(scope="module")
def aloha(tiny_assets: dict[str, CheckpointFiles]) -> CheckpointFiles:
    return tiny_assets["aloha"]


def test_chosen_chunk_is_the_reactive_chunk_of_one_candidate(aloha: CheckpointFiles) -> None:
    planner = make_planner(aloha, 1)
    reactive = reference_policy(aloha)
    query = ActionQuery(random_observation("aloha"), reactive.instructions[0], seed=195, steps=3)
    result = planner.infer(query)
    assert result.actions.shape == (50, 14) and 0.0 <= result.value <= 1.0
    candidates = [
        reactive.infer(ActionQuery(query.observation, query.instruction, seed, 3)) for seed in (195, 196, 197)
    ]
    errors = [np.abs(candidate.actions - result.actions).max() for candidate in candidates]
    assert min(errors) < 1e-4, errors
    assert sorted(errors)[1] > 1e-3  # the candidates differ, so the match identifies one
    assert "planning" in result.timings_ms
    planner.close()


def test_splitting_candidates_over_workers_gives_the_same_choice(aloha: CheckpointFiles) -> None:
    query = ActionQuery(random_observation("aloha", seed=3), "fold the t-shirt", seed=10, steps=1)
    one, two = make_planner(aloha, 1), make_planner(aloha, 2)
    first, second = one.infer(query), two.infer(query)
    np.testing.assert_allclose(first.actions, second.actions, atol=1e-5)  # measured 2.4e-7
    assert first.value == pytest.approx(second.value, abs=1e-5)
    one.close()
    two.close()


@pytest.mark.parametrize(
    "config",
    [CONFIG, dataclasses.replace(CONFIG, search_depth=2, search_depth_value_aggregation_scheme="average")],
    ids=["depth 1", "depth 2"],
)
def test_batched_passes_give_the_same_values_and_choice_as_pass_after_pass(
    aloha: CheckpointFiles, config: PlanningConfig
) -> None:
    with load_policies(CheckpointSource(aloha), planning=config) as loaded:
        assert loaded.planning is not None and not loaded.planning.batch_passes  # it does not pay on the CPU
        workers = list(loaded.device_networks)
        query = ActionQuery(random_observation("aloha", seed=5), "fold the t-shirt", seed=40, steps=2)
        results = []
        for batch_passes in (False, True):
            with contextlib.closing(
                PlanningPolicy(loaded.reactive.model, workers, config, batch_passes=batch_passes)
            ) as planner:
                results.append(planner.infer(query).candidates)
    alone, batched = results
    assert alone is not None and batched is not None
    # fp32: a batch of another size may round the DiT's matmuls differently, far below the values' spread.
    np.testing.assert_allclose(batched.values_by_depth, alone.values_by_depth, rtol=0, atol=1e-5)
    np.testing.assert_allclose(batched.actions_by_depth, alone.actions_by_depth, rtol=0, atol=1e-5)
    assert np.ptp(alone.values) > 1e-3
    assert batched.chosen == alone.chosen
    np.testing.assert_array_equal(alone.actions_by_depth[:, 0], alone.actions)
    # Deeper entries are the chunks of the branches' action passes, from the predicted states: not the first's.
    deeper = alone.actions_by_depth[:, 1:]
    assert deeper.shape[1] == config.value_entries() - 1
    assert all(np.abs(deeper[:, k] - alone.actions).max() > 1e-3 for k in range(deeper.shape[1]))


def test_variance_scale_samples_every_pass_with_the_scale_of_its_seed(aloha: CheckpointFiles) -> None:
    query = ActionQuery(random_observation("aloha", seed=5), "fold the t-shirt", seed=40, steps=3)
    with load_policies(CheckpointSource(aloha), planning=CONFIG, use_variance_scale=True) as loaded:
        assert loaded.planning is not None
        scored = loaded.planning.infer(query)
        assert scored.candidates is not None
        chosen = scored.candidates.chosen
        # The chosen chunk is the scaled reactive chunk of its seed, and batching the passes keeps every value.
        chunk = loaded.reactive.infer(dataclasses.replace(query, seed=query.seed + chosen))
        np.testing.assert_allclose(scored.actions, chunk.actions, rtol=0, atol=1e-5)
        model, workers = loaded.reactive.model, list(loaded.device_networks)
        with contextlib.closing(
            PlanningPolicy(model, workers, CONFIG, batch_passes=True, use_variance_scale=True)
        ) as batching:
            batched = batching.infer(query).candidates
        assert batched is not None and batched.chosen == chosen
        np.testing.assert_allclose(batched.values_by_depth, scored.candidates.values_by_depth, rtol=0, atol=1e-5)
        # The same networks (and their device noise cache) without the scale: a fresh load's values.
        with contextlib.closing(PlanningPolicy(model, workers, CONFIG)) as unscaled_planner:
            unscaled = unscaled_planner.infer(query).candidates
    with load_policies(CheckpointSource(aloha), planning=CONFIG) as fresh:
        assert fresh.planning is not None
        plain = fresh.planning.infer(query).candidates
    assert unscaled is not None and plain is not None
    np.testing.assert_array_equal(unscaled.values_by_depth, plain.values_by_depth)
    assert np.abs(unscaled.values_by_depth - scored.candidates.values_by_depth).max() > 1e-4


def test_a_slow_query_says_how_far_it_got_after_each_pass(
    aloha: CheckpointFiles, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    planner = make_planner(aloha, 1)
    query = ActionQuery(random_observation("aloha", seed=4), "fold the t-shirt", seed=10, steps=1)
    with caplog.at_level(logging.INFO, logger=candidate_search.__name__):
        planner.infer(query)  # fast: nothing said
        assert not caplog.records
        monkeypatch.setattr(candidate_search, "_PROGRESS_AFTER_S", 0.0)  # every query is slow now
        planner.infer(query)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("planning: 1 policy pass(es) of 3 candidate(s) done, ")
    assert any(" world_model pass(es) " in line for line in lines) and lines[-1].endswith("s into the query")
    planner.close()


def test_bad_configuration_and_requests(aloha: CheckpointFiles) -> None:
    with pytest.raises(ConfigError, match="num_queries_best_of_n"):
        PlanningConfig(num_queries_best_of_n=0)
    with pytest.raises(ConfigError, match="device_networks"):
        PlanningPolicy(make_planner(aloha, 1).model, [])


def test_q_value_planning_returns_the_images_of_the_chosen_candidates_world_model_passes(
    aloha: CheckpointFiles,
) -> None:
    """With one candidate the Q(s, a) and the V(s') configurations choose the same action pass, whose world-model
    passes (the same seeds and steps in both) give the images."""
    single = dataclasses.replace(CONFIG, num_queries_best_of_n=1)
    q_value = dataclasses.replace(single, ar_value_prediction=False, ar_qvalue_prediction=True)
    query = ActionQuery(random_observation("aloha"), "fold the t-shirt", seed=7, steps=2, return_future_images=True)
    images = []
    for config in (q_value, single, dataclasses.replace(q_value, ar_future_prediction=False)):
        with load_policies(CheckpointSource(aloha), planning=config) as loaded:
            assert loaded.planning is not None
            images.append(loaded.planning.infer(query).future_images)
    q_images, v_images, without_world_model = images
    assert q_images is not None and v_images is not None and without_world_model is None
    assert q_images.keys() == v_images.keys()
    for camera in q_images:
        np.testing.assert_array_equal(q_images[camera], v_images[camera])


def test_the_reference_encode_serves_planning_too(aloha: CheckpointFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    encodes: list[str] = []
    for name in ("encode", "encode_conditioning"):
        original = getattr(TorchAutoencoder, name)

        def spy(self: TorchAutoencoder, *args: object, _name: str = name, _original: object = original) -> object:
            encodes.append(_name)
            return _original(self, *args)  # type: ignore[operator]

        monkeypatch.setattr(TorchAutoencoder, name, spy)
    single = dataclasses.replace(CONFIG, num_queries_best_of_n=1)
    with load_policies(CheckpointSource(aloha, encode_full_sequence=True), planning=single) as loaded:
        assert loaded.planning is not None
        encodes.clear()
        loaded.planning.infer(ActionQuery(random_observation("aloha"), "fold the t-shirt", seed=3, steps=1))
    assert encodes == ["encode"]  # all pixel frames through the VAE, as `act --reference`
