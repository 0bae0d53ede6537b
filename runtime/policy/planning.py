"""Best-of-N planning as the official ALOHA planning server computes it (`deploy.py` `PolicyServer.get_server_action`
with `cosmos_utils.get_future_state_prediction` / `get_value_prediction` / `get_qvalue_prediction`).

Candidate i takes seed s + i. Its action pass runs the policy model; then, per `PlanningConfig`:

* scored by the planning model (`ar_value_prediction`): world-model passes (step counts `future_steps()`, the j-th with
  seed s + j), and for every predicted state value passes (`value_steps()`, the k-th with seed s + k, the same seeds
  for every state); the values of all states and members are pooled and aggregated once. Without the value ensemble
  only the value of the first predicted state counts (QUIRK, cosmos_utils.py 1508-1541: the others are computed there
  and dropped, so they are not computed here);
* scored by Q(s, a) (`ar_qvalue_prediction`): value passes conditioned on the action pass itself;
* otherwise by the value slot of its own action pass.

`search_depth` d > 1 repeats action → world model → value from each predicted state (its predicted images and proprio
moved into the current-state slots, then the observed proprio written back over the proprio, as every official pass
re-injects it: QUIRK, deploy.py 486-490). Every level reuses the candidate's seeds. Level 2 expands every state of
level 1, later levels only the states of the last branch (QUIRK, deploy.py 479-480, 545). The per-level values are
aggregated by `search_depth_value_aggregation_scheme`; the chunk returned is always the first level's.

The best candidate wins, the base seed's unless another is strictly better (deploy.py 645-654). Passes of one step
count run as one batch over a worker's candidates, and the candidates are split over `workers` (one per device),
which run concurrently; a candidate's value does not depend on the split.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.policy.api import (
    ActionQuery,
    CandidateResults,
    ChunkResult,
    DenoisingNetwork,
    NetworkFn,
    StageTimer,
)
from cosmos_edge.runtime.policy.conditioning import ConditioningMode, promote_future_state
from cosmos_edge.runtime.policy.planning_config import DepthAggregation, PlanningConfig
from cosmos_edge.runtime.policy.steps import (
    ModelPolicy,
    PolicyModel,
    TextBinding,
    denoising_steps,
    encode_observation,
    read_chunks,
    read_values,
    sample_latents,
)
from cosmos_edge.runtime.policy.value_aggregation import ValueAggregation, aggregate_values, select_best_candidate


def candidate_shares(num_candidates: int, num_workers: int) -> list[list[int]]:
    """Candidate indices per worker, round robin; the batch sizes a worker's DiT must serve follow from these."""
    return [list(range(index, num_candidates, num_workers)) for index in range(num_workers)]


def planning_batch_sizes(num_candidates: int, num_workers: int) -> tuple[int, ...]:
    """The DiT batch sizes a planning worker runs (and batch 1 for the reactive mode), sorted."""
    shares = {len(share) for share in candidate_shares(num_candidates, num_workers)} - {0}
    return tuple(sorted({1, *shares}))


@dataclass(frozen=True)
class PlanningWorker:
    """The networks of one device: the policy DiT (actions) and the planning DiT (future state, value). They are
    the same object when no separate planning checkpoint is given."""

    policy_network: DenoisingNetwork
    planning_network: DenoisingNetwork


@dataclass(frozen=True)
class _BoundWorker:
    policy: TextBinding
    planner: TextBinding


@dataclass(frozen=True)
class CandidateScores:
    latents: np.ndarray  # "n c t h w": each candidate's first-level action sample
    values: np.ndarray  # "n": what ranks the candidates
    values_by_depth: np.ndarray  # "n entries"


@dataclass(frozen=True)
class _Search:
    """One worker's passes for its candidates (`seeds`), with its networks bound to the query's instruction."""

    config: PlanningConfig
    model: PolicyModel
    policy: NetworkFn
    planner: NetworkFn
    seeds: list[int]
    action_steps: int
    timer: StageTimer

    def run(self, clean: np.ndarray) -> CandidateScores:
        actions = self._sample(self.policy, clean, ConditioningMode.POLICY, 0, self.action_steps)
        config = self.config
        if not config.scores_with_planning_model:
            value = read_values(self.model.platform, actions)
            return CandidateScores(actions, value, value[:, None])
        if not config.ar_value_prediction:  # Q(s, a): valued from the action pass itself
            value = self._value(actions)
            return CandidateScores(actions, value, value[:, None])
        states = self._predicted_states(actions)
        by_depth = [self._value(*states)]
        for _ in range(2, config.search_depth + 1):
            for state in states:  # the list bound when the level starts: later levels follow the last branch
                deeper = self._sample(self.policy, self._as_current(state, clean), ConditioningMode.POLICY, 0)
                states = self._predicted_states(deeper)
                by_depth.append(self._value(*states))
        per_depth = np.stack(by_depth, axis=1)
        if config.search_depth_value_aggregation_scheme is DepthAggregation.USE_LAST_VALUE:
            value = per_depth[:, -1]
        else:
            value = np.array([aggregate_values(row, ValueAggregation.AVERAGE) for row in per_depth], np.float32)
        return CandidateScores(actions, value, per_depth)

    def _predicted_states(self, actions: np.ndarray) -> list[np.ndarray]:
        """World-model passes from an action sample, one per ensemble member."""
        mode = ConditioningMode.WORLD_MODEL
        return [
            self._sample(self.planner, actions, mode, j, steps) for j, steps in enumerate(self.config.future_steps())
        ]

    def _value(self, *states: np.ndarray) -> np.ndarray:
        """ "n" values of the candidates from their states (value passes of every state, pooled)."""
        config = self.config
        network, mode, platform = self.planner, config.value_mode, self.model.platform
        if not config.use_ensemble_value_predictions:  # one pass, seed s (value_steps() has the one step count)
            return read_values(platform, self._sample(network, states[0], mode, 0, config.value_steps()[0]))
        pooled = np.stack(
            [
                read_values(platform, self._sample(network, state, mode, k, steps))
                for state in states
                for k, steps in enumerate(config.value_steps())
            ],
            axis=1,
        )
        scheme = config.value_ensemble_aggregation_scheme
        return np.array([aggregate_values(row, scheme) for row in pooled], np.float32)

    def _as_current(self, state: np.ndarray, clean: np.ndarray) -> np.ndarray:
        """A predicted state in the current-state slots, with the observed proprio written back over its proprio."""
        promoted = promote_future_state(state, self.model.platform)
        slot = self.model.platform.proprio_slot
        promoted[:, :, slot] = clean[:, :, slot]
        return promoted

    def _sample(
        self, network: NetworkFn, clean: np.ndarray, mode: ConditioningMode, offset: int, steps: int | None = None
    ) -> np.ndarray:
        if self.config.randomize_seed:  # QUIRK, cosmos_utils.py 885: a fresh seed in [0, 256) for every pass
            seeds = [secrets.randbits(32) % 256 for _ in self.seeds]
        else:
            seeds = [seed + offset for seed in self.seeds]
        steps = self.action_steps if steps is None else steps
        return sample_latents(network, self.model.platform, clean, mode, seeds, steps, self.timer)


class PlanningPolicy(ModelPolicy):
    """A `Policy` whose chunk is the best of `num_queries_best_of_n` sampled chunks. `close()` stops its threads."""

    def __init__(
        self, model: PolicyModel, workers: Sequence[PlanningWorker], config: PlanningConfig | None = None
    ) -> None:
        if not workers:
            raise ConfigError("workers: expected at least one planning worker")
        self._model = model
        text = model.text_embeddings
        self._workers = tuple(
            _BoundWorker(TextBinding(w.policy_network, text), TextBinding(w.planning_network, text)) for w in workers
        )
        self._config = config or PlanningConfig()
        self._pool = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="planning")

    @property
    def config(self) -> PlanningConfig:
        return self._config

    def reset(self) -> None:
        for worker in self._workers:
            worker.policy.reset()
            worker.planner.reset()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def infer(self, query: ActionQuery) -> ChunkResult:
        if query.return_future_images:
            raise InputError("return_future_images: not available in planning mode; use the reactive mode")
        steps = denoising_steps(query, self._config.num_denoising_steps_action)
        timer = StageTimer()
        encoded = encode_observation(self._model, query.observation, timer, full_sequence=False)
        shares = [
            [query.seed + index for index in share]
            for share in candidate_shares(self._config.num_queries_best_of_n, len(self._workers))
        ]
        jobs = [
            self._pool.submit(self._score, worker, query.instruction, encoded.clean, share, steps)
            for worker, share in zip(self._workers, shares, strict=True)
            if share
        ]
        with timer.stage("planning"):
            results = [job.result() for job in jobs]
        order = np.argsort([seed for share in shares for seed in share])  # back to candidate order
        latents = np.concatenate([result.latents for result in results])[order]
        values = np.concatenate([result.values for result in results])[order]
        by_depth = np.concatenate([result.values_by_depth for result in results])[order]
        best = select_best_candidate(values.tolist(), base_index=0)
        with timer.stage("readout"):
            actions, future_proprio = read_chunks(self._model, latents)
        candidates = CandidateResults(best, actions, values, by_depth)
        return ChunkResult(actions[best], float(values[best]), future_proprio[best], None, timer.as_dict(), candidates)

    def _score(
        self, worker: _BoundWorker, instruction: str, clean: np.ndarray, seeds: list[int], steps: int
    ) -> CandidateScores:
        timer = StageTimer()  # per worker; the caller reports the wall time of all workers together
        search = _Search(
            self._config,
            self._model,
            worker.policy.for_instruction(instruction, timer),
            worker.planner.for_instruction(instruction, timer),
            seeds,
            steps,
            timer,
        )
        return search.run(clean)
