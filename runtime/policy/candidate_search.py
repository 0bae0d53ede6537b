"""One planning worker's sampling passes for its candidates, as the official planning server runs them
(`deploy.py` `get_server_action` with `cosmos_utils.get_future_state_prediction` / `get_value_prediction` /
`get_qvalue_prediction`): the action pass, then world-model and value passes per `PlanningConfig`, and the values that
rank the candidates. `planning.PlanningPolicy` splits the candidates over workers (`ranking` chooses among them); the
quirks each pass reproduces are listed there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy import latents
from cosmos_edge.runtime.policy.api import NetworkFn, StageTimer
from cosmos_edge.runtime.policy.conditioning import ConditioningMode
from cosmos_edge.runtime.policy.planning_config import DepthAggregation, PlanningConfig
from cosmos_edge.runtime.policy.steps import BoundNetwork, PolicyModel, read_chunks, read_values, sample_latents
from cosmos_edge.runtime.policy.value_aggregation import ValueAggregation, aggregate_values

_LOG = logging.getLogger(__name__)
_PROGRESS_AFTER_S = 10.0  # a query running longer says how far it got after each of its passes


@dataclass(frozen=True)
class CandidateScores:
    latents: np.ndarray  # "n c t h w": each candidate's first-level action sample
    values: np.ndarray  # "n" float64: what ranks the candidates (the official depth `average` is a float64 mean)
    values_by_depth: np.ndarray  # "n entries"
    actions_by_depth: np.ndarray  # "n entries chunk action_dim": the chunk of each entry's action pass, un-normalised
    states: tuple[np.ndarray, ...] = ()  # "n c t h w" per world-model member: the first level's predicted states

    def row(self, index: int) -> CandidateScores:
        """The scores of one candidate (a batch of one)."""
        pick = slice(index, index + 1)
        states = tuple(state[pick] for state in self.states)
        return CandidateScores(
            self.latents[pick], self.values[pick], self.values_by_depth[pick], self.actions_by_depth[pick], states
        )


@dataclass(frozen=True)
class _Pass:
    """A sampling pass of every candidate of a worker: from `clean` ("n c t h w"), seeds s + `offset`."""

    clean: np.ndarray
    offset: int
    steps: int


@dataclass(frozen=True)
class CandidateSearch:
    """One worker's passes for its candidates (`seeds`), with its networks bound to the query's instruction.

    With `batch_passes`, passes that do not depend on each other (the members of an ensemble, the branches of a
    level) run as one batch: one DiT call per denoising step instead of one per step and pass."""

    config: PlanningConfig
    model: PolicyModel
    policy: BoundNetwork
    planner: BoundNetwork
    seeds: list[int]
    action_steps: int
    batch_passes: bool
    timer: StageTimer

    use_variance_scale: bool = False  # the official option: every pass's sigma range scaled by its seed's factors
    stops: tuple[threading.Event, ...] = ()  # any set: the next network call raises `Stopped`
    started: float = dataclasses.field(default_factory=time.perf_counter)  # for the progress of a slow query

    def run(self, clean: np.ndarray) -> CandidateScores:
        return self.score(self.act(clean), clean)

    def act(self, clean: np.ndarray) -> np.ndarray:
        """The candidates' action pass: "n c t h w"."""
        (actions,) = self._run(self.policy, ConditioningMode.POLICY, [_Pass(clean, 0, self.action_steps)])
        return actions

    def score(self, actions: np.ndarray, clean: np.ndarray) -> CandidateScores:
        """Ranks the candidates of the action samples `actions` by the configured passes."""
        config = self.config
        chunks = [read_chunks(self.model, actions)[0]]
        if not config.scores_with_planning_model:
            value = _ranking_values(self.model.platform, actions)
            return CandidateScores(actions, value.astype(np.float64), value[:, None], _by_depth(chunks))
        if not config.ar_value_prediction:  # Q(s, a): valued from the action pass itself
            (value,) = self._values([[actions]])
            return CandidateScores(actions, value.astype(np.float64), value[:, None], _by_depth(chunks))
        (states,) = self.predicted_states([actions])
        first_states = tuple(states)
        by_depth = self._values([states])
        for _ in range(2, config.search_depth + 1):
            # Every state of the level branches (the list bound when the level starts), branch after branch or all
            # as one batch; the next level follows the last branch only.
            for group in [states] if self.batch_passes else [[state] for state in states]:
                branches = [_Pass(self._as_current(state, clean), 0, self.action_steps) for state in group]
                branch_actions = self._run(self.policy, ConditioningMode.POLICY, branches)
                chunks += [read_chunks(self.model, sample)[0] for sample in branch_actions]
                branch_states = self.predicted_states(branch_actions)
                by_depth.extend(self._values(branch_states))
            states = branch_states[-1]
        per_depth = np.stack(by_depth, axis=1)
        if config.search_depth_value_aggregation_scheme is DepthAggregation.USE_LAST_VALUE:
            value = per_depth[:, -1].astype(np.float64)
        else:  # deploy.py 612: `np.mean` of the per-depth values, a float64 that ranks unrounded
            value = np.array([_pooled(row, ValueAggregation.AVERAGE) for row in per_depth], np.float64)
        return CandidateScores(actions, value, per_depth, _by_depth(chunks), first_states)

    def predicted_states(self, action_samples: list[np.ndarray]) -> list[list[np.ndarray]]:
        """World-model passes from each action sample, one per ensemble member (the j-th with seed s + j)."""
        members = list(enumerate(self.config.future_steps()))
        passes = [_Pass(actions, j, steps) for actions in action_samples for j, steps in members]
        states = self._run(self.planner, ConditioningMode.WORLD_MODEL, passes)
        return [states[i : i + len(members)] for i in range(0, len(states), len(members))]

    def _values(self, state_groups: list[list[np.ndarray]]) -> list[np.ndarray]:
        """ "n" values of the candidates for each group of states (the value passes of every state, pooled)."""
        config = self.config
        if not config.use_ensemble_value_predictions:  # one pass of the first state, seed s (QUIRK, see `planning`)
            members = [(0, config.value_steps()[0])]
            state_groups = [states[:1] for states in state_groups]
        else:
            members = list(enumerate(config.value_steps()))
        passes = [_Pass(state, k, steps) for states in state_groups for state in states for k, steps in members]
        platform, scheme = self.model.platform, config.value_ensemble_aggregation_scheme
        samples = self._run(self.planner, config.value_mode, passes)
        values = iter([_ranking_values(platform, sample) for sample in samples])
        groups = []
        for states in state_groups:
            pooled = np.stack([next(values) for _ in range(len(states) * len(members))], axis=1)
            if not config.use_ensemble_value_predictions:
                groups.append(pooled[:, 0])
            else:
                groups.append(np.array([_pooled(row, scheme) for row in pooled], np.float32))
        return groups

    def _as_current(self, state: np.ndarray, clean: np.ndarray) -> np.ndarray:
        """A predicted state in the current-state slots, with the observed proprio written back over its proprio."""
        promoted = latents.promote_future_state(state, self.model.platform)
        latents.copy_slots(promoted, clean, [self.model.platform.proprio_slot])
        return promoted

    def _run(self, network: BoundNetwork, mode: ConditioningMode, passes: list[_Pass]) -> list[np.ndarray]:
        samples = self._sample(network, mode, passes)
        if (elapsed_s := time.perf_counter() - self.started) > _PROGRESS_AFTER_S:  # quiet when planning is fast
            _LOG.info(
                "planning: %d %s pass(es) of %d candidate(s) done, %.0f s into the query",
                len(passes),
                mode.value,
                len(self.seeds),
                elapsed_s,
            )
        return samples

    def _sample(self, network: BoundNetwork, mode: ConditioningMode, passes: list[_Pass]) -> list[np.ndarray]:
        """The samples of each pass, in order: all passes as one batch, or pass after pass."""
        platform, timer, n, scale = self.model.platform, self.timer, len(self.seeds), self.use_variance_scale
        if self.stops:
            network = dataclasses.replace(network, call=_stoppable(network.call, self.stops))
        seeds = [self._seeds(each.offset) for each in passes]  # drawn in pass order (randomize_seed)
        if not self.batch_passes:
            return [
                sample_latents(
                    network, platform, each.clean, mode, pass_seeds, each.steps, timer, use_variance_scale=scale
                )
                for each, pass_seeds in zip(passes, seeds, strict=True)
            ]
        batch = sample_latents(
            network,
            platform,
            np.concatenate([np.broadcast_to(each.clean, (n, *each.clean.shape[1:])) for each in passes]),
            mode,
            [seed for pass_seeds in seeds for seed in pass_seeds],
            [each.steps for each in passes for _ in range(n)],
            timer,
            use_variance_scale=scale,
        )
        return [batch[i : i + n] for i in range(0, len(batch), n)]

    def _seeds(self, offset: int) -> list[int]:
        # QUIRK: a fresh seed in [0, 256) for every pass (cosmos_utils.py 885, 1287, 1324-1326, 1462, 1478-1479,
        # 1509-1510, 1598, 1612-1613, 1642-1643; deploy.py 501-502).
        if self.config.randomize_seed:
            return [secrets.randbits(32) % 256 for _ in self.seeds]
        return [seed + offset for seed in self.seeds]


def _by_depth(chunks: list[np.ndarray]) -> np.ndarray:
    """Per-entry chunks, each "n chunk action_dim" → "n entries chunk action_dim"."""
    return np.stack(chunks, axis=1)


def _ranking_values(platform: PlatformSpec, samples: np.ndarray) -> np.ndarray:
    """`read_values` of samples "b c t h w", NaN where the value slot holds a value that is not finite: the official
    clip reads +inf as 1 (the best value), so a network's failure would win the choice instead of being ranked out."""
    finite = latents.value_is_finite(samples, platform.value_slot)
    return np.where(finite, read_values(platform, samples), np.float32(np.nan))


def _pooled(values: np.ndarray, scheme: ValueAggregation) -> float:
    """`aggregate_values`, or NaN when a value is not finite (the network's failure: the candidate is ranked out)."""
    return aggregate_values(values, scheme) if np.isfinite(values).all() else math.nan


class Stopped(Exception):
    """Raised in a worker whose query's deadline has passed, or whose policy is closing, at its next network call."""


def _stoppable(network: NetworkFn, stops: tuple[threading.Event, ...]) -> NetworkFn:
    def call(x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
        if any(stop.is_set() for stop in stops):
            raise Stopped
        return network(x, timesteps, condition_mask)

    return call
