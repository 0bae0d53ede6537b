"""The official planning options, against pass lists and values derived by hand from `deploy.py` (the planning spec).

A scripted DiT double (tests/helpers/scripted_network.py) records each sampling pass: its conditioning mode, the seed
of each candidate and its number of network calls; and it scripts the value each pass predicts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
import threading
import time

import numpy as np
import pytest

from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError, NonFiniteOutput
from cosmos_edge.runtime.platforms import PlatformSpec, platform_spec
from cosmos_edge.runtime.policy.api import MAX_SEED, ActionQuery, PlanningOutcome, StageTimer
from cosmos_edge.runtime.policy.conditioning import ConditioningMode
from cosmos_edge.runtime.policy.latents import future_image_frames
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.planning import DeviceNetworks, PlanningPolicy
from cosmos_edge.runtime.policy.planning_config import PRESETS, PlanningConfig, ensemble_steps, planning_preset
from cosmos_edge.runtime.policy.sampler import evaluation_sigmas
from cosmos_edge.runtime.policy.steps import PolicyModel
from cosmos_edge.runtime.policy.text_embeddings import TextEmbeddings
from cosmos_edge.runtime.policy.value_aggregation import ValueAggregation
from tests.helpers.bridge_doubles import wait_for
from tests.helpers.observations import random_observation
from tests.helpers.scripted_network import ScriptedNetwork, ValueOf, slots

ALOHA = platform_spec("aloha")
# The clean slots of each pass's conditioning (a masked Q pass conditions on what a world-model pass does).
POLICY, WORLD, V_FUTURE, V_ALL, Q = (
    slots(ALOHA, mode)
    for mode in (
        ConditioningMode.POLICY,
        ConditioningMode.WORLD_MODEL,
        ConditioningMode.VALUE_FUTURE_STATE,
        ConditioningMode.VALUE,
        ConditioningMode.Q_VALUE,
    )
)
BASE_SEED = 100


class BlackConditioning:
    """The conditioning encoder of a test: zero latents for blank, proprio and cameras."""

    def __init__(self, platform: PlatformSpec = ALOHA) -> None:
        self.platform = platform

    def encode_conditioning(self, images: object, timer: StageTimer) -> np.ndarray:
        return np.zeros((1, 16, self.platform.num_conditional_frames, 28, 28), np.float32)

    def encode(self, video: np.ndarray) -> np.ndarray:
        raise AssertionError("planning encodes the conditioning prefix only")

    def decode(self, latent: np.ndarray) -> np.ndarray:
        raise AssertionError("planning decodes nothing")


def planner(
    config: PlanningConfig,
    value_of: ValueOf | None = None,
    workers: int = 1,
    batch_passes: bool = False,
    seeds: range = range(700),
    platform: PlatformSpec = ALOHA,
) -> tuple[PlanningPolicy, list[ScriptedNetwork]]:
    stats = DatasetStats(
        actions_min=-np.ones(platform.action_dim),
        actions_max=np.ones(platform.action_dim),
        proprio_min=-np.ones(platform.proprio_dim),
        proprio_max=np.ones(platform.proprio_dim),
    )
    text = TextEmbeddings.from_arrays({"task": np.zeros((1, 4, 8), np.float32)})
    encoder = BlackConditioning(platform)
    model = PolicyModel(platform, stats, text, encoder, encoder)
    networks = [ScriptedNetwork(platform, value_of, seeds) for _ in range(workers)]
    pairs = [DeviceNetworks(net, net) for net in networks]
    return PlanningPolicy(model, pairs, config, batch_passes=batch_passes), networks


def run(  # type: ignore[no-untyped-def]
    config: PlanningConfig, value_of: ValueOf | None = None, workers: int = 1, batch_passes: bool = False
):
    """One planning query; pass after pass in the official order unless `batch_passes`."""
    policy, networks = planner(config, value_of, workers, batch_passes)
    result = policy.infer(ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED))
    policy.close()
    return result, networks


def trace(network: ScriptedNetwork) -> list[tuple[tuple[int, ...], list[int], int]]:
    return [(p.clean_slots, p.seeds, p.calls) for p in network.passes]


def calls(steps: int) -> int:
    return len(evaluation_sigmas(steps))


SMALL = PlanningConfig(
    num_queries_best_of_n=2,
    num_denoising_steps_action=1,
    num_denoising_steps_future_state=3,
    num_future_state_predictions_in_ensemble=2,  # world-model steps [1, 3]
    num_denoising_steps_value=4,
    num_value_predictions_in_ensemble=2,  # value steps [1, 4]
)


def test_the_main_configuration_runs_the_official_passes() -> None:
    _, (network,) = run(SMALL)
    s = [BASE_SEED, BASE_SEED + 1]
    plus = lambda k: [seed + k for seed in s]  # noqa: E731
    values_of_a_state = [(V_FUTURE, plus(0), calls(1)), (V_FUTURE, plus(1), calls(4))]
    assert trace(network) == [
        (POLICY, plus(0), calls(1)),
        (WORLD, plus(0), calls(1)),  # world-model member j: seed s + j, steps linspace(1, 3, 2)[j]
        (WORLD, plus(1), calls(3)),
        *values_of_a_state,  # value member k of every state: seed s + k, the same seeds for both states
        *values_of_a_state,
    ]


def test_without_the_value_ensemble_only_the_first_states_value_counts() -> None:
    config = PlanningConfig(**{**SMALL.__dict__, "use_ensemble_value_predictions": False})
    _, (network,) = run(config)
    assert trace(network)[3:] == [(V_FUTURE, [BASE_SEED, BASE_SEED + 1], calls(4))]  # seed s, all value steps


def test_q_value_and_the_unmasked_value() -> None:
    q = PlanningConfig(
        **{**SMALL.__dict__, "ar_future_prediction": False, "ar_value_prediction": False, "ar_qvalue_prediction": True}
    )
    s = [BASE_SEED, BASE_SEED + 1]
    # From the action pass, no world model: the value ensemble's seeds s + k and steps [1, 4] (a world-model pass
    # would take steps [1, 3]; its mask equals Q's on every platform).
    value_passes = [(s, calls(1)), ([seed + 1 for seed in s], calls(4))]
    _, (network,) = run(PlanningConfig(**{**q.__dict__, "mask_future_state_for_qvalue_prediction": True}))
    assert trace(network) == [(POLICY, s, calls(1)), *((Q, seeds, n) for seeds, n in value_passes)]
    _, (network,) = run(q)
    assert trace(network) == [(POLICY, s, calls(1)), *((V_ALL, seeds, n) for seeds, n in value_passes)]  # unmasked
    unmasked = PlanningConfig(**{**SMALL.__dict__, "mask_current_state_action_for_value_prediction": False})
    _, (network,) = run(unmasked)
    assert {p.clean_slots for p in network.passes[3:]} == {V_ALL}  # V(s, a, s')


def test_the_base_preset_is_one_candidate_ranked_by_its_own_pass() -> None:
    config = planning_preset("base", num_denoising_steps_action=1)
    result, (network,) = run(config, value_of=lambda seed, clean: 0.25)
    assert trace(network) == [(POLICY, [BASE_SEED], calls(1))]
    assert result.value == pytest.approx(0.25, abs=1e-4)


@pytest.mark.parametrize("name", ["aloha", "libero", "robocasa"])
def test_the_action_pass_takes_the_platforms_default_steps_unless_configured(name: str) -> None:
    platform = platform_spec(name)
    for configured, expected in ((None, platform.default_action_steps), (2, 2)):
        config = planning_preset("base", num_denoising_steps_action=configured)
        policy, (network,) = planner(config, platform=platform)
        policy.infer(ActionQuery(random_observation(platform), "task", seed=BASE_SEED))
        policy.close()
        assert [p.calls for p in network.passes] == [calls(expected)]


def test_search_depth_branches_as_the_official_server() -> None:
    config = PlanningConfig(
        **{**SMALL.__dict__, "search_depth": 3, "use_ensemble_value_predictions": False, "num_queries_best_of_n": 1}
    )
    result, (network,) = run(config)
    modes = [p.clean_slots for p in network.passes]
    level = [POLICY, WORLD, WORLD, V_FUTURE]
    # Level 1, then level 2 from each of the 2 predicted states, then level 3 from the last branch's 2 states.
    assert modes == level + level * 2 + level * 2
    assert result.candidates is not None and result.candidates.values_by_depth.shape == (1, 1 + 2 * 2)
    # A chunk per per-depth value (the official `actions_by_depth`), the first level's first.
    assert result.candidates.actions_by_depth.shape == (1, 1 + 2 * 2, ALOHA.chunk_size, ALOHA.action_dim)
    np.testing.assert_array_equal(result.candidates.actions_by_depth[:, 0], result.candidates.actions)
    first, deeper = network.passes[0], network.passes[4]
    assert all(p.seeds == [BASE_SEED] for p in network.passes if p.clean_slots in (POLICY, V_FUTURE))  # seeds reused
    proprio, cameras = ALOHA.proprio_slot, list(ALOHA.camera_slots.values())
    # The deeper action pass sees the predicted images in the current slots, and the observed proprio.
    np.testing.assert_array_equal(deeper.clean[:, :, proprio], first.clean[:, :, proprio])
    assert np.abs(deeper.clean[:, :, cameras]).max() > 0 and np.abs(first.clean[:, :, cameras]).max() == 0


def test_the_search_depth_average_ranks_with_the_float64_mean() -> None:
    # deploy.py 612: `np.mean` of the per-depth values, a float64 that ranks unrounded (two means a third of a
    # float32 ulp apart would tie in float32, and the base seed would win).
    config = dataclasses.replace(SMALL, search_depth=2, search_depth_value_aggregation_scheme="average")
    result, _ = run(config, scripted)
    assert result.candidates is not None
    by_depth = result.candidates.values_by_depth
    assert result.candidates.values.dtype == np.float64
    np.testing.assert_array_equal(result.candidates.values, by_depth.astype(np.float64).mean(axis=1))


VALUES = {100: 0.2, 101: 0.3, 102: 0.9, 103: 0.9, 104: 0.9}


def one_step(**options: object) -> PlanningConfig:
    return PlanningConfig(
        num_queries_best_of_n=3,
        num_denoising_steps_action=1,
        num_denoising_steps_future_state=1,  # members [1, 1]
        num_future_state_predictions_in_ensemble=2,
        num_denoising_steps_value=1,  # members [1, 1, 1]
        num_value_predictions_in_ensemble=3,
        **options,  # type: ignore[arg-type]
    )


def scripted(seed: int, clean: tuple[int, ...]) -> float:
    return VALUES[seed] if clean == V_FUTURE else 0.0


@pytest.mark.parametrize("failure", [math.nan, math.inf, -math.inf])  # the official clip would read +inf as 1.0
def test_a_candidate_with_a_non_finite_value_is_ranked_out_and_none_fails_the_query(
    failure: float, caplog: pytest.LogCaptureFixture
) -> None:
    def broken_for(seeds: set[int]) -> ValueOf:  # a network that returns `failure` for these value passes
        return lambda seed, clean: failure if clean == V_FUTURE and seed in seeds else scripted(seed, clean)

    with caplog.at_level(logging.WARNING):
        result, _ = run(one_step(), broken_for({104}))  # candidate 2 pools seeds 102-104: not finite
    assert result.candidates is not None and np.isnan(result.candidates.values[2])
    assert result.candidates.chosen == 1 and result.value == pytest.approx(0.7, abs=1e-4)  # the best finite one
    assert np.isfinite(result.candidates.actions).all()  # its action pass is read as any other's
    assert "candidates [2] have a value, chunk or future proprio that is not finite; ranked out" in caplog.text
    with pytest.raises(NonFiniteOutput, match="no candidate has a finite value, chunk and future proprio"):
        run(one_step(), broken_for(set(range(100, 105))))


def test_a_candidate_whose_chunk_is_not_finite_is_ranked_out(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    scripted_call = ScriptedNetwork._call

    def nan_chunk_for_seed_102(
        network: ScriptedNetwork, x: np.ndarray, timesteps: np.ndarray, mask: np.ndarray
    ) -> np.ndarray:
        velocity = scripted_call(network, x, timesteps, mask)
        current = network.passes[-1]
        if current.clean_slots == POLICY:
            velocity[[seed == 102 for seed in current.seeds], :, ALOHA.action_slot] = np.nan
        return velocity

    monkeypatch.setattr(ScriptedNetwork, "_call", nan_chunk_for_seed_102)
    with caplog.at_level(logging.WARNING):
        result, _ = run(one_step(), scripted)  # candidate 2 (seed 102) has the best value, 0.9, and a NaN chunk
    assert result.candidates is not None and np.isnan(result.candidates.actions[2]).all()
    assert result.candidates.chosen == 1 and np.isfinite(result.actions).all()
    assert "candidates [2] have a value, chunk or future proprio that is not finite; ranked out" in caplog.text


def test_values_and_choice_derived_by_hand() -> None:
    # Candidate i pools the values of seeds 100+i, 101+i, 102+i for each of its 2 states; all exceed 0.05, so
    # majority_mean is their mean: 0.4667, 0.7, 0.9. Candidate 2 is strictly better than the base: it is chosen.
    result, _ = run(one_step(), scripted)
    assert result.candidates is not None
    np.testing.assert_allclose(result.candidates.values, [1.4 / 3, 0.7, 0.9], atol=1e-4)
    assert result.candidates.chosen == 2 and result.value == pytest.approx(0.9, abs=1e-4)
    np.testing.assert_array_equal(result.actions, result.candidates.actions[2])
    lcb, _ = run(one_step(value_ensemble_aggregation_scheme=ValueAggregation.LCB), scripted)
    pooled = np.array([0.2, 0.3, 0.9] * 2)
    assert lcb.candidates is not None
    assert lcb.candidates.values[0] == pytest.approx(pooled.mean() - pooled.std(ddof=1), abs=1e-4)


def test_the_base_seed_wins_ties_and_the_split_over_workers_changes_nothing() -> None:
    tie, _ = run(one_step(), lambda seed, clean: 0.5)
    assert tie.candidates is not None and tie.candidates.chosen == 0
    one, _ = run(one_step(), scripted)
    two, _ = run(one_step(), scripted, workers=2)
    assert one.candidates is not None and two.candidates is not None
    np.testing.assert_array_equal(one.candidates.values, two.candidates.values)
    assert one.candidates.chosen == two.candidates.chosen


# Q(s, a) without future images runs no world-model pass: its 3 world-model members take no seed.
Q_VALUE_ONLY = dataclasses.replace(
    SMALL,
    ar_value_prediction=False,
    ar_qvalue_prediction=True,
    ar_future_prediction=False,
    num_future_state_predictions_in_ensemble=3,
)


@pytest.mark.parametrize("config", [SMALL, Q_VALUE_ONLY], ids=["V(s')", "Q(s, a)"])
def test_the_highest_seed_a_configuration_takes_reaches_the_last_32_bit_seed_and_no_further(
    config: PlanningConfig,
) -> None:
    highest = MAX_SEED - config.largest_seed_offset()
    policy, (network,) = planner(config, seeds=range(highest, MAX_SEED + 1))
    policy.infer(ActionQuery(random_observation("aloha"), "task", seed=highest))
    assert max(seed for p in network.passes for seed in p.seeds) == MAX_SEED  # the offset is exact
    with pytest.raises(InputError, match=f"seed: expected 0..{highest} with this planning configuration") as caught:
        policy.infer(ActionQuery(random_observation("aloha"), "task", seed=highest + 1))
    assert caught.value.field == "seed"
    policy.close()


def test_randomize_seed_draws_a_seed_below_256_for_every_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter(range(1000, 2000))
    monkeypatch.setattr("cosmos_edge.runtime.policy.candidate_search.secrets.randbits", lambda bits: next(draws))
    _, (network,) = run(PlanningConfig(**{**SMALL.__dict__, "randomize_seed": True}))
    seeds = [seed for p in network.passes for seed in p.seeds]
    assert seeds == [value % 256 for value in range(1000, 1000 + len(seeds))]


def test_ensemble_step_lists_are_numpys_linspace_truncated() -> None:
    assert ensemble_steps(5, 3) == (1, 3, 5) and ensemble_steps(5, 5) == (1, 2, 3, 4, 5)
    assert ensemble_steps(5, 1) == (1,) and ensemble_steps(5, 8) == (1, 1, 2, 2, 3, 3, 4, 5)
    assert ensemble_steps(10, 3) == (1, 5, 10)
    main = PRESETS["main"]
    assert main.future_steps() == (1, 3, 5) and main.value_steps() == (1, 2, 3, 4, 5)
    assert PRESETS["depth3"].future_steps() == (5,) and PRESETS["depth3"].value_steps() == (5,)


def test_the_deploy_defaults_preset_holds_deploy_configs_field_defaults() -> None:
    # deploy.py 213-218 and 232-252, field by field (the action steps: 10, the platform's default for ALOHA).
    official = {
        "num_queries_best_of_n": 1,
        "num_denoising_steps_future_state": 1,
        "num_denoising_steps_value": 1,
        "use_ensemble_future_state_predictions": False,
        "num_future_state_predictions_in_ensemble": 3,
        "future_state_ensemble_aggregation_scheme": "average",
        "use_ensemble_value_predictions": False,
        "num_value_predictions_in_ensemble": 5,
        "value_ensemble_aggregation_scheme": "average",
        "ar_future_prediction": False,
        "ar_value_prediction": False,
        "ar_qvalue_prediction": False,
        "mask_future_state_for_qvalue_prediction": False,
        "mask_current_state_action_for_value_prediction": False,
        "search_depth": 1,
        "search_depth_value_aggregation_scheme": "use_last_value",
        "randomize_seed": False,
    }
    preset = PRESETS["deploy-defaults"]
    assert {name: getattr(preset, name) for name in official} == official
    assert preset.num_denoising_steps_action is None and ALOHA.default_action_steps == 10
    # The official base command (deploy.py 26-50) gives no planning flag but values the defaults already have.
    assert PRESETS["base"] == preset


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"ar_future_prediction": False}, "ar_value_prediction"),
        ({"ar_value_prediction": False}, "ar_future_prediction"),
        ({"search_depth": 2, "ar_value_prediction": False, "ar_qvalue_prediction": True}, "search_depth"),
        ({"search_depth": 2, "ar_qvalue_prediction": True}, "search_depth: above 1 is not supported"),
        ({"value_ensemble_aggregation_scheme": "median"}, "value_ensemble_aggregation_scheme"),
        ({"num_value_predictions_in_ensemble": 0}, "num_value_predictions_in_ensemble"),
    ],
)
def test_combinations_the_official_server_answers_with_error_are_refused_at_once(
    options: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError, match=field):
        PlanningConfig(**options)  # type: ignore[arg-type]


def test_lcb_over_a_single_pooled_value_is_refused_at_once() -> None:
    lcb = ValueAggregation.LCB
    with pytest.raises(ConfigError, match="value_ensemble_aggregation_scheme: lcb needs 2 or more values"):
        PlanningConfig(
            num_value_predictions_in_ensemble=1,
            num_future_state_predictions_in_ensemble=1,
            value_ensemble_aggregation_scheme=lcb,
        )
    with pytest.raises(ConfigError, match=r"pools 1 \(raise num_value_predictions_in_ensemble\)"):  # Q(s, a) pools
        # the value passes of the action pass alone: more world-model members would not help
        PlanningConfig(
            ar_future_prediction=False,
            ar_value_prediction=False,
            ar_qvalue_prediction=True,
            num_value_predictions_in_ensemble=1,
            value_ensemble_aggregation_scheme=lcb,
        )
    # Values to pool from either ensemble, or no pooling at all (the value ensemble off).
    assert (
        PlanningConfig(num_value_predictions_in_ensemble=1, value_ensemble_aggregation_scheme=lcb).pooled_values() == 3
    )
    two = PlanningConfig(num_future_state_predictions_in_ensemble=1, num_value_predictions_in_ensemble=2)
    assert dataclasses.replace(two, value_ensemble_aggregation_scheme=lcb).pooled_values() == 2
    PlanningConfig(
        num_value_predictions_in_ensemble=1,
        num_future_state_predictions_in_ensemble=1,
        use_ensemble_value_predictions=False,
        value_ensemble_aggregation_scheme=lcb,
    )


# --- batched passes -------------------------------------------------------------------------------------------------


def test_batched_passes_share_one_call_per_denoising_step() -> None:
    _, (network,) = run(SMALL, batch_passes=True)
    s = [BASE_SEED, BASE_SEED + 1]
    members = s + [seed + 1 for seed in s]  # member j of both candidates: seeds s + j
    assert trace(network) == [
        (POLICY, s, calls(1)),
        (WORLD, members, calls(3)),  # the 1-step and the 3-step member share the first call
        (V_FUTURE, members * 2, calls(4)),  # the value members of both predicted states
    ]


BATCHING_CASES = {
    "main": SMALL,
    "depth 3, average": PlanningConfig(
        **{**SMALL.__dict__, "search_depth": 3, "search_depth_value_aggregation_scheme": "average"}
    ),
    "depth 2, one value pass": PlanningConfig(
        **{**SMALL.__dict__, "search_depth": 2, "use_ensemble_value_predictions": False}
    ),
    "q value, masked": PlanningConfig(
        **{
            **SMALL.__dict__,
            "ar_future_prediction": False,
            "ar_value_prediction": False,
            "ar_qvalue_prediction": True,
            "mask_future_state_for_qvalue_prediction": True,
        }
    ),
    "own value": planning_preset("base", num_queries_best_of_n=3, num_denoising_steps_action=3),
    **{
        f"scheme {scheme.value}": PlanningConfig(**{**SMALL.__dict__, "value_ensemble_aggregation_scheme": scheme})
        for scheme in (ValueAggregation.AVERAGE, ValueAggregation.LCB, ValueAggregation.SUCCESS_VOTE)
    },
}


@pytest.mark.parametrize("config", BATCHING_CASES.values(), ids=BATCHING_CASES.keys())
def test_batched_passes_give_every_candidate_the_same_value_and_the_same_choice(config: PlanningConfig) -> None:
    # The double's x0 is the scaled input, so every value comes from its pass's seeds, steps and conditioning.
    alone, _ = run(config)
    batched, _ = run(config, batch_passes=True)
    assert alone.candidates is not None and batched.candidates is not None
    np.testing.assert_array_equal(batched.candidates.values_by_depth, alone.candidates.values_by_depth)
    np.testing.assert_array_equal(batched.candidates.actions, alone.candidates.actions)
    assert batched.candidates.chosen == alone.candidates.chosen


def test_batched_passes_with_scripted_values_choose_as_derived_by_hand() -> None:
    result, _ = run(one_step(), scripted, batch_passes=True)
    assert result.candidates is not None and result.candidates.chosen == 2
    np.testing.assert_allclose(result.candidates.values, [1.4 / 3, 0.7, 0.9], atol=1e-4)


# --- deadline -------------------------------------------------------------------------------------------------------


class HeldNetwork:
    """Wraps a scripted double: calls whose batch holds a seed in `held` (and whose pass conditions on `slots`)
    wait until `release` is set, as a slow device would."""

    def __init__(self, inner: ScriptedNetwork, held: set[int], slots: tuple[int, ...] | None = None) -> None:
        self.inner, self.held, self.slots = inner, held, slots
        self.holding, self.release = threading.Event(), threading.Event()

    def bind_text(self, text_embedding: np.ndarray):  # type: ignore[no-untyped-def]
        call = self.inner.bind_text(text_embedding)

        def held_call(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
            out = call(x, timesteps, condition_mask)
            current = self.inner.passes[-1]
            if self.held & set(current.seeds) and self.slots in (None, current.clean_slots):
                self.holding.set()
                assert self.release.wait(timeout=60)
            return out

        return held_call


def plan_within_deadline(  # type: ignore[no-untyped-def]
    held: set[int], slots: tuple[int, ...] | None = None, value_of: ValueOf = scripted
):
    span = np.ones(ALOHA.action_dim)
    stats = DatasetStats(actions_min=-span, actions_max=span, proprio_min=-span, proprio_max=span)
    text = TextEmbeddings.from_arrays({"task": np.zeros((1, 4, 8), np.float32)})
    model = PolicyModel(ALOHA, stats, text, BlackConditioning(), BlackConditioning())
    network = HeldNetwork(ScriptedNetwork(ALOHA, value_of), held, slots)
    # The held pass runs out the deadline; the scripted passes before it take milliseconds, even on a loaded machine.
    policy = PlanningPolicy(model, [DeviceNetworks(network, network)], one_step(), deadline_ms=2000)
    query = ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED)
    result = policy.infer(query)  # returns although a pass is held
    network.release.set()
    again = policy.infer(query)  # waits for the stopped worker, then plans with nothing held
    policy.close()
    return result, again


def test_a_deadline_answers_with_the_best_candidate_scored_in_time() -> None:
    # Candidate i draws seeds 100 + i .. 102 + i: holding seed 104 holds candidate 2's last value pass only.
    # Candidates 0 and 1 are scored (0.4667, 0.7), and 1 is chosen.
    result, again = plan_within_deadline(held={104})
    assert result.candidates is not None
    assert result.candidates.outcome is PlanningOutcome.BEST_SO_FAR
    assert result.candidates.chosen == 1 and result.value == pytest.approx(0.7, abs=1e-4)
    assert np.isnan(result.candidates.values[2]) and np.isnan(result.candidates.actions[2]).all()
    assert np.isnan(result.candidates.actions_by_depth[2]).all()
    np.testing.assert_array_equal(result.candidates.actions_by_depth[:2, 0], result.candidates.actions[:2])
    np.testing.assert_array_equal(result.actions, result.candidates.actions[1])
    assert again.candidates is not None and again.candidates.outcome is PlanningOutcome.COMPLETE
    assert again.candidates.chosen == 2


def test_a_deadline_with_no_candidate_scored_answers_with_the_base_action_pass() -> None:
    # Every value pass is held: nothing is ranked, and the reply is candidate 0's own action pass and value.
    result, _ = plan_within_deadline(held={100, 101, 102, 103, 104}, slots=V_FUTURE)
    assert result.candidates is not None and result.candidates.outcome is PlanningOutcome.REACTIVE
    assert result.candidates.chosen == 0 and np.isnan(result.candidates.values).all()
    assert np.isfinite(result.actions).all() and 0.0 <= result.value <= 1.0
    np.testing.assert_array_equal(result.candidates.actions_by_depth[0, 0], result.actions)  # its pass always runs
    assert np.isnan(result.candidates.actions_by_depth[1:]).all()


def test_a_deadline_whose_only_scored_candidate_failed_answers_with_the_base_action_pass() -> None:
    # Candidates 1 and 2 are held (seeds 103, 104); candidate 0's value passes return NaN: it is ranked out.
    def failing_first(seed: int, clean: tuple[int, ...]) -> float:
        return math.nan if clean == V_FUTURE and seed == 100 else scripted(seed, clean)

    result, _ = plan_within_deadline(held={103, 104}, slots=V_FUTURE, value_of=failing_first)
    assert result.candidates is not None and result.candidates.outcome is PlanningOutcome.REACTIVE
    assert np.isnan(result.candidates.values).all() and np.isnan(result.candidates.values_by_depth).all()
    np.testing.assert_array_equal(result.candidates.actions_by_depth[0, 0], result.actions)
    assert np.isfinite(result.actions).all() and np.isfinite(result.value)


class SlowConditioning(BlackConditioning):
    def encode_conditioning(self, images: object, timer: StageTimer) -> np.ndarray:
        time.sleep(0.05)  # a slow encode
        return super().encode_conditioning(images, timer)


def test_a_deadline_spent_before_any_candidate_is_said_to_be(caplog: pytest.LogCaptureFixture) -> None:
    span = np.ones(ALOHA.action_dim)
    stats = DatasetStats(actions_min=-span, actions_max=span, proprio_min=-span, proprio_max=span)
    text = TextEmbeddings.from_arrays({"task": np.zeros((1, 4, 8), np.float32)})
    model = PolicyModel(ALOHA, stats, text, BlackConditioning(), SlowConditioning())
    network = ScriptedNetwork(ALOHA, scripted)
    policy = PlanningPolicy(model, [DeviceNetworks(network, network)], one_step(), deadline_ms=10)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.policy.planning"):
        result = policy.infer(ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED))
    policy.close()
    assert result.candidates is not None and result.candidates.outcome is PlanningOutcome.REACTIVE
    (warning,) = [record.getMessage() for record in caplog.records]
    assert warning.startswith("planning deadline 10 ms passed before any candidate was scored: encoding the ")
    assert re.fullmatch(r".*base candidate's action pass took \d+ ms", warning)  # what it measured, not checked here


@pytest.mark.parametrize("deadline_ms", [0, 1e13])  # 1e13: past what a wait takes
def test_a_deadline_must_be_positive_and_at_most_a_day(deadline_ms: float) -> None:
    policy, _ = planner(one_step())
    with pytest.raises(ConfigError, match="planning_deadline_ms: expected a positive number of milliseconds up to"):
        workers = [DeviceNetworks(ScriptedNetwork(ALOHA), ScriptedNetwork(ALOHA))]
        PlanningPolicy(policy.model, workers, deadline_ms=deadline_ms)
    policy.close()


# --- future images ----------------------------------------------------------------------------------------------------


class RecordingAutoencoder(BlackConditioning):
    """Encodes everything to zeros; decodes a latent to a clip whose pixel frames follow its slots' means, and
    records every clip it returns."""

    def __init__(self) -> None:
        self.decoded: list[np.ndarray] = []

    def encode(self, video: np.ndarray) -> np.ndarray:
        return np.zeros((1, 16, (video.shape[2] - 1) // 4 + 1, 28, 28), np.float32)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        slot_of_frame = [0] + [(frame - 1) // 4 + 1 for frame in range(1, 1 + 4 * (latent.shape[2] - 1))]
        levels = np.tanh(latent[0].mean(axis=(0, 2, 3)))[slot_of_frame]  # one level per pixel frame
        video = np.broadcast_to(levels[None, None, :, None, None], (1, 3, len(levels), 224, 224)).copy()
        video[:, 1] *= 0.5  # channels differ, so a channel mix-up would show
        self.decoded.append(video)
        return video


def plan_future_images(config: PlanningConfig) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    span = np.ones(ALOHA.action_dim)
    stats = DatasetStats(actions_min=-span, actions_max=span, proprio_min=-span, proprio_max=span)
    text = TextEmbeddings.from_arrays({"task": np.zeros((1, 4, 8), np.float32)})
    autoencoder = RecordingAutoencoder()
    network = ScriptedNetwork(ALOHA)
    model = PolicyModel(ALOHA, stats, text, autoencoder, autoencoder)
    with contextlib.closing(PlanningPolicy(model, [DeviceNetworks(network, network)], config)) as policy:
        query = ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED, return_future_images=True)
        result = policy.infer(query)
    assert result.future_images is not None
    return dict(result.future_images), autoencoder.decoded


def test_future_images_of_a_plan_combine_the_chosen_candidates_predicted_states() -> None:
    average, decoded = plan_future_images(SMALL)
    assert len(decoded) == 2  # one decode per world-model member of the chosen candidate, nothing else
    members = [future_image_frames(ALOHA, video) for video in decoded]
    for camera, image in average.items():
        mean = np.mean([member[camera].astype(np.float32) for member in members], axis=0)
        np.testing.assert_array_equal(image, np.clip(np.round(mean), 0, 255).astype(np.uint8))
    assert any(not np.array_equal(members[0][c], members[1][c]) for c in average)  # the members differ
    last, decoded = plan_future_images(dataclasses.replace(SMALL, future_state_ensemble_aggregation_scheme="last"))
    for camera, image in last.items():
        np.testing.assert_array_equal(image, future_image_frames(ALOHA, decoded[-1])[camera])


def test_future_images_of_a_plan_ranked_by_its_own_pass_are_that_passs() -> None:
    images, decoded = plan_future_images(planning_preset("base", num_denoising_steps_action=1))
    assert len(decoded) == 1
    for camera, image in images.items():
        np.testing.assert_array_equal(image, future_image_frames(ALOHA, decoded[0])[camera])


def test_q_value_planning_without_a_world_model_has_no_future_images_and_encodes_no_whole_clip() -> None:
    policy, _ = planner(Q_VALUE_ONLY)  # its autoencoder refuses a whole-clip encode
    assert not Q_VALUE_ONLY.predicts_future_images
    with contextlib.closing(policy):
        query = ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED, return_future_images=True)
        assert policy.infer(query).future_images is None


class CallRecorder:
    """Records the batch size and thread of every call of its bound network."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []

    def bind_text(self, text_embedding: np.ndarray):  # type: ignore[no-untyped-def]
        def call(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
            self.calls.append((x.shape[0], threading.current_thread().name))
            return np.zeros_like(x)

        return call


@pytest.mark.parametrize(("candidates", "batches"), [(2, [2, 2]), (5, [3, 2])])
def test_warm_up_runs_a_batched_call_on_each_workers_networks_on_the_planning_threads(
    candidates: int, batches: list[int]
) -> None:
    """At the batch of the worker's share (at least 2): a compiled DiT compiles its batched graph, and an engine
    runs the graph of that batch, which a bundle holds for it."""
    policy_nets, planning_nets = [CallRecorder(), CallRecorder()], [CallRecorder(), CallRecorder()]
    workers = [DeviceNetworks(p, q) for p, q in zip(policy_nets, planning_nets, strict=True)]
    scripted, _ = planner(SMALL)  # for its model
    scripted.close()
    config = dataclasses.replace(SMALL, num_queries_best_of_n=candidates)
    with contextlib.closing(PlanningPolicy(scripted.model, workers, config)) as policy:
        policy.warm_up()
    for recorders in (policy_nets, planning_nets):
        assert [[batch for batch, _ in recorder.calls] for recorder in recorders] == [[n] for n in batches]
        assert all(thread.startswith("planning") for recorder in recorders for _, thread in recorder.calls)


def test_warm_up_with_an_observation_scores_a_candidate_at_batch_1_on_every_worker() -> None:
    """What a deadline's query runs first on each device (its batch-1 graphs, and the timesteps a DiT replaying CUDA
    graphs captures) runs at start, not inside the first deadline."""
    policy_nets, planning_nets = [CallRecorder(), CallRecorder()], [CallRecorder(), CallRecorder()]
    workers = [DeviceNetworks(p, q) for p, q in zip(policy_nets, planning_nets, strict=True)]
    scripted, _ = planner(SMALL)  # for its model
    scripted.close()
    config = dataclasses.replace(SMALL, num_denoising_steps_action=3)
    with contextlib.closing(PlanningPolicy(scripted.model, workers, config, deadline_ms=1e6)) as policy:
        policy.warm_up(random_observation("aloha"))
    for recorder in policy_nets:  # the base candidate's 3-step action pass at batch 1, then the batched call
        assert [batch for batch, _ in recorder.calls] == [1, 1, 1, 2]
    for recorder in planning_nets:  # its world-model and value passes, then the batched call
        assert len(recorder.calls) > 1 and recorder.calls[-1][0] == 2
    assert all(thread.startswith("planning") for r in (*policy_nets, *planning_nets) for _, thread in r.calls)


class FailingNetwork(ScriptedNetwork):
    """A scripted double whose device fails on its second pass (once `after` is set, when given)."""

    def __init__(self, platform: PlatformSpec, after: threading.Event | None = None) -> None:
        super().__init__(platform)
        self.after = after

    def bind_text(self, text_embedding: np.ndarray):  # type: ignore[no-untyped-def]
        call = super().bind_text(text_embedding)

        def failing(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
            if len(self.passes) >= 1:
                assert self.after is None or self.after.wait(timeout=60)
                raise EngineError("the device failed")
            return call(x, timesteps, condition_mask)

        return failing


def test_a_worker_that_fails_within_the_deadline_fails_the_query() -> None:
    scripted, _ = planner(one_step())
    scripted.close()
    network = FailingNetwork(ALOHA)
    policy = PlanningPolicy(scripted.model, [DeviceNetworks(network, network)], one_step(), deadline_ms=60_000)
    with contextlib.closing(policy), pytest.raises(EngineError, match="the device failed"):
        policy.infer(ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED))


def test_a_failing_worker_stops_the_others_at_their_next_call() -> None:
    template, _ = planner(one_step())
    template.close()
    # Worker 0 is held in candidate 0's first world-model pass; worker 1 fails on its second pass meanwhile.
    held = HeldNetwork(ScriptedNetwork(ALOHA, scripted), held={BASE_SEED}, slots=WORLD)
    failing = FailingNetwork(ALOHA, after=held.holding)
    workers = [DeviceNetworks(held, held), DeviceNetworks(failing, failing)]
    policy = PlanningPolicy(template.model, workers, one_step(), deadline_ms=60_000)
    with contextlib.closing(policy):
        with pytest.raises(EngineError, match="the device failed"):
            policy.infer(ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED))
        held.release.set()
        policy.reset()  # waits for worker 0's last call
    # The base action pass and the held pass; stopped at its next call instead of scoring on.
    assert [p.clean_slots for p in held.inner.passes] == [POLICY, WORLD]


@pytest.mark.parametrize("deadline_ms", [None, 60_000.0])
def test_closing_stops_a_query_in_flight_at_its_next_network_call(deadline_ms: float | None) -> None:
    template, _ = planner(one_step())
    template.close()
    # Candidate 0's first world-model pass is held, as a long query on a slow device; the policy closes meanwhile.
    # Under a deadline too, closing fails the query rather than answering with what was scored.
    held = HeldNetwork(ScriptedNetwork(ALOHA, scripted), held={BASE_SEED}, slots=WORLD)
    worker = DeviceNetworks(held, held)
    policy = PlanningPolicy(template.model, [worker], one_step(), batch_passes=False, deadline_ms=deadline_ms)
    failures: list[BaseException] = []

    def query() -> None:
        try:
            policy.infer(ActionQuery(random_observation("aloha"), "task", seed=BASE_SEED))
        except BaseException as error:
            failures.append(error)

    querying = threading.Thread(target=query)
    querying.start()
    assert held.holding.wait(timeout=60)
    closing = threading.Thread(target=policy.close)  # waits for the call in flight
    closing.start()
    wait_for(policy._closing.is_set, 60, "close() to stop the workers")
    held.release.set()
    closing.join(timeout=60)
    querying.join(timeout=60)
    assert not closing.is_alive() and not querying.is_alive()
    assert len(failures) == 1 and isinstance(failures[0], EngineError) and "closed during the query" in str(failures[0])
    # The action pass and the held world-model pass; nothing after (the query has 3 candidates to score).
    assert [p.clean_slots for p in held.inner.passes] == [POLICY, WORLD]
