"""Best-of-N planning (official ALOHA planning server): N action candidates, each scored by world-model rollouts
and value predictions, the best one returned.

Per candidate i (seed s + i): an action pass (policy model); future states from the planning model with the step
counts `future_steps` (seeds s, s+1, ...); for every future state, values with the step counts `value_steps` under
V(s') conditioning; the values are aggregated (`majority_mean` by default) and the best candidate wins, the base
seed's unless another is strictly better. Passes with the same step count run as one batch, and the candidates are
split over `workers` (one per GPU), which run concurrently.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime import latent_codec
from cosmos_edge.runtime.conditioning import ConditioningMode
from cosmos_edge.runtime.cosmos_policy import CosmosPolicy
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy_api import ActionQuery, ChunkResult
from cosmos_edge.runtime.timing import StageTimer
from cosmos_edge.runtime.value_aggregation import ValueAggregation, aggregate_values, select_best_candidate


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


@dataclass(frozen=True)
class PlanningWorker:
    """The two models of one device: the base policy (actions) and the planning model (future state, value)."""

    policy: CosmosPolicy
    planner: CosmosPolicy


@dataclass(frozen=True)
class CandidateScores:
    latents: np.ndarray  # "n c t h w": each candidate's action-pass sample
    values: np.ndarray  # "n": aggregated value per candidate


class PlanningPolicy:
    """A `Policy` whose chunk is the best of `num_candidates` sampled chunks."""

    def __init__(self, workers: Sequence[PlanningWorker], config: PlanningConfig | None = None) -> None:
        if not workers:
            raise ConfigError("workers: expected at least one planning worker")
        platforms = {worker.policy.platform.name for worker in workers} | {w.planner.platform.name for w in workers}
        if len(platforms) != 1:
            raise ConfigError(f"workers: expected one platform for every model, got {sorted(platforms)}")
        self._workers = tuple(workers)
        self._config = config or PlanningConfig()
        self._pool = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="planning")

    @property
    def platform(self) -> PlatformSpec:
        return self._workers[0].policy.platform

    @property
    def instructions(self) -> tuple[str, ...]:
        return self._workers[0].policy.instructions

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
        policy = self._workers[0].policy
        steps = policy.action_steps(query)
        encoded = policy.encode(query.observation, timer, full_sequence=False)
        seeds = [query.seed + index for index in range(self._config.num_candidates)]
        shares = [seeds[index :: len(self._workers)] for index in range(len(self._workers))]
        jobs = [
            self._pool.submit(self._score, worker, query.instruction, encoded.clean, share, steps)
            for worker, share in zip(self._workers, shares, strict=False)
            if share
        ]
        with timer.stage("planning"):
            results = [job.result() for job in jobs]
        seed_order = np.argsort([seed for share in shares for seed in share])  # back to candidate order
        latents = np.concatenate([result.latents for result in results])[seed_order]
        values = np.concatenate([result.values for result in results])[seed_order]
        best = select_best_candidate(values.tolist(), base_index=0)
        with timer.stage("readout"):
            actions, future_proprio = policy.read_chunk(latents[best : best + 1])
        return ChunkResult(actions, float(values[best]), future_proprio, None, timer.as_dict())

    def _score(
        self, worker: PlanningWorker, instruction: str, clean: np.ndarray, seeds: list[int], steps: int
    ) -> CandidateScores:
        """Action passes for `seeds` as one batch, then world-model and value passes, batched per step count.

        The j-th future state and the k-th value sample of the candidate with seed s use seeds s + j and s + k, so
        a candidate's score does not depend on how candidates are split over workers.
        """
        timer = StageTimer()  # per worker; the caller reports the wall time of all workers together
        policy_net = worker.policy.network_for(instruction, timer)
        planner_net = worker.planner.network_for(instruction, timer)

        def offset(index: int) -> list[int]:
            return [seed + index for seed in seeds]

        actions = worker.policy.denoise(policy_net, clean, ConditioningMode.POLICY, seeds, steps, timer)
        values = []
        for future_index, future_steps in enumerate(self._config.future_steps):
            future = worker.planner.denoise(
                planner_net, actions, ConditioningMode.WORLD_MODEL, offset(future_index), future_steps, timer
            )
            for value_index, value_steps in enumerate(self._config.value_steps):
                sample = worker.planner.denoise(
                    planner_net, future, ConditioningMode.VALUE_FUTURE_STATE, offset(value_index), value_steps, timer
                )
                values.append(latent_codec.read_value(sample, self.platform.value_slot))
        per_candidate = np.stack(values, axis=1)  # "n (futures values)"
        aggregated = np.array([aggregate_values(row, self._config.aggregation) for row in per_candidate], np.float32)
        return CandidateScores(actions, aggregated)
