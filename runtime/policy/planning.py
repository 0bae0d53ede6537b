"""Best-of-N planning (official ALOHA planning server): N action candidates, each scored by world-model rollouts
and value predictions, the best one returned.

Per candidate i (seed s + i): an action pass (policy model); future states from the planning model with the step
counts `future_steps` (seeds s, s+1, ...); for every future state, values with the step counts `value_steps` under
V(s') conditioning; the values are aggregated (`majority_mean` by default) and the best candidate wins, the base
seed's unless another is strictly better. Passes with the same step count run as one batch, and the candidates are
split over `workers` (one per device), which run concurrently.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, DenoisingNetwork, StageTimer
from cosmos_edge.runtime.policy.conditioning import ConditioningMode
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


@dataclass(frozen=True)
class PlanningConfig:
    """Defaults are the official ALOHA planning command (`deploy.py` docstring)."""

    num_candidates: int = 8
    future_steps: tuple[int, ...] = (1, 3, 5)
    value_steps: tuple[int, ...] = (1, 2, 3, 4, 5)
    aggregation: ValueAggregation = ValueAggregation.MAJORITY_MEAN

    def __post_init__(self) -> None:
        if self.num_candidates < 1:
            raise ConfigError(f"num_candidates: expected >= 1, got {self.num_candidates}")
        for name in ("future_steps", "value_steps"):
            steps = getattr(self, name)
            if not steps or min(steps) < 1:
                raise ConfigError(f"{name}: expected one or more positive step counts, got {steps}")


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
    latents: np.ndarray  # "n c t h w": each candidate's action-pass sample
    values: np.ndarray  # "n": aggregated value per candidate


class PlanningPolicy(ModelPolicy):
    """A `Policy` whose chunk is the best of `num_candidates` sampled chunks. `close()` stops its worker threads."""

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

    def reset(self) -> None:
        for worker in self._workers:
            worker.policy.reset()
            worker.planner.reset()

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def infer(self, query: ActionQuery) -> ChunkResult:
        if query.return_future_images:
            raise InputError("return_future_images: not available in planning mode; use the reactive mode")
        timer = StageTimer()
        steps = denoising_steps(self.platform, query)
        encoded = encode_observation(self._model, query.observation, timer, full_sequence=False)
        shares = [
            [query.seed + index for index in share]
            for share in candidate_shares(self._config.num_candidates, len(self._workers))
        ]
        jobs = [
            self._pool.submit(self._score, worker, query.instruction, encoded.clean, share, steps)
            for worker, share in zip(self._workers, shares, strict=True)
            if share
        ]
        with timer.stage("planning"):
            results = [job.result() for job in jobs]
        seed_order = np.argsort([seed for share in shares for seed in share])  # back to candidate order
        latents = np.concatenate([result.latents for result in results])[seed_order]
        values = np.concatenate([result.values for result in results])[seed_order]
        best = select_best_candidate(values.tolist(), base_index=0)
        with timer.stage("readout"):
            actions, future_proprio = read_chunks(self._model, latents[best : best + 1])
        return ChunkResult(actions[0], float(values[best]), future_proprio[0], None, timer.as_dict())

    def _score(
        self, worker: _BoundWorker, instruction: str, clean: np.ndarray, seeds: list[int], steps: int
    ) -> CandidateScores:
        """Action passes for `seeds` as one batch, then world-model and value passes, batched per step count.

        The j-th future state and the k-th value sample of the candidate with seed s use seeds s + j and s + k, so
        a candidate's score does not depend on how candidates are split over workers.
        """
        timer = StageTimer()  # per worker; the caller reports the wall time of all workers together
        policy_net = worker.policy.for_instruction(instruction, timer)
        planner_net = worker.planner.for_instruction(instruction, timer)
        platform = self.platform

        def offset(index: int) -> list[int]:
            return [seed + index for seed in seeds]

        actions = sample_latents(policy_net, platform, clean, ConditioningMode.POLICY, seeds, steps, timer)
        values = []
        for future_index, future_steps in enumerate(self._config.future_steps):
            future = sample_latents(
                planner_net, platform, actions, ConditioningMode.WORLD_MODEL, offset(future_index), future_steps, timer
            )
            for value_index, value_steps in enumerate(self._config.value_steps):
                mode = ConditioningMode.VALUE_FUTURE_STATE
                sample = sample_latents(planner_net, platform, future, mode, offset(value_index), value_steps, timer)
                values.append(read_values(platform, sample))
        per_candidate = np.stack(values, axis=1)  # "n (futures values)"
        aggregated = np.array([aggregate_values(row, self._config.aggregation) for row in per_candidate], np.float32)
        return CandidateScores(actions, aggregated)
