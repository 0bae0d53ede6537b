"""The choice among planning candidates: each one's results laid out in candidate order, the ones whose network
output is not finite ranked out, and the official selection (deploy.py 645-654: the base seed's candidate unless
another is strictly better), or the base candidate's unranked action pass when none was scored in time."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.errors import NonFiniteOutput
from cosmos_edge.runtime.policy.api import PlanningOutcome
from cosmos_edge.runtime.policy.candidate_search import CandidateScores
from cosmos_edge.runtime.policy.steps import PolicyModel, read_chunks
from cosmos_edge.runtime.policy.value_aggregation import select_best_candidate

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankedCandidates:
    """The candidates of a query in candidate order (NaN where not computed in time), and the choice."""

    latents: np.ndarray
    values: np.ndarray
    values_by_depth: np.ndarray
    actions_by_depth: np.ndarray  # NaN where not computed in time, but the base candidate's first level always
    future_proprio: np.ndarray  # "n proprio_dim", NaN where not computed in time
    computed: np.ndarray  # bool per candidate: scored in time, or the base candidate (its action pass always runs)
    chosen: int
    outcome: PlanningOutcome
    value: float  # the chosen candidate's value, or the base action pass's own for `REACTIVE`
    chosen_states: tuple[np.ndarray, ...] = ()  # its first-level predicted states "1 c t h w", if a world model ran


@dataclass(frozen=True)
class BasePass:
    """The base candidate's action pass (seed s), what a deadline's query answers with when nothing was ranked:
    its latent "1 c t h w" and the value it read."""

    latent: np.ndarray
    value: float


def rank_candidates(
    model: PolicyModel,
    scored: dict[int, CandidateScores],
    num_candidates: int,
    *,
    entries: int,
    base: BasePass | None = None,
) -> RankedCandidates:
    """Ranks the candidates scored (index → its one-row scores, `entries` values by depth); without any, falls back
    to the `base` action pass."""
    rows = list(scored.values())
    latent_shape = rows[0].latents.shape[1:] if rows else base.latent.shape[1:]  # type: ignore[union-attr]
    latents = np.full((num_candidates, *latent_shape), np.nan, np.float32)
    values = np.full(num_candidates, np.nan, np.float64)
    by_depth = np.full((num_candidates, entries), np.nan, np.float32)
    chunk_shape = (model.platform.chunk_size, model.platform.action_dim)
    actions_by_depth = np.full((num_candidates, entries, *chunk_shape), np.nan, np.float32)
    if base is not None:
        latents[0] = base.latent[0]
        actions_by_depth[0, 0] = read_chunks(model, base.latent)[0][0]
    for index, row in scored.items():
        latents[index], values[index], by_depth[index] = row.latents[0], row.values[0], row.values_by_depth[0]
        actions_by_depth[index] = row.actions_by_depth[0]
    computed = np.zeros(num_candidates, bool)
    computed[sorted(scored)] = True
    computed[0] |= base is not None
    future_proprio = _future_proprio(model, latents, computed)
    indices = sorted(scored)
    # A candidate whose network output was not finite (NaN or infinity, a failure of the engine) is ranked out: its
    # values read as not computed.
    finite = [
        index
        for index in indices
        if np.isfinite(values[index])
        and np.isfinite(actions_by_depth[index, 0]).all()
        and np.isfinite(future_proprio[index]).all()
    ]
    if failed := sorted(set(indices) - set(finite)):
        _LOG.warning(
            "planning: candidates %s have a value, chunk or future proprio that is not finite; ranked out", failed
        )
        values[failed], by_depth[failed] = np.nan, np.nan
    if not finite:
        if base is None:
            raise NonFiniteOutput(
                "planning: no candidate has a finite value, chunk and future proprio: the network returned NaN or "
                "infinity (check the checkpoints' weights and the instruction's text embedding)"
            )
        outcome = PlanningOutcome.REACTIVE  # none scored in time (or none usable): the base action pass, unranked
        return RankedCandidates(
            latents, values, by_depth, actions_by_depth, future_proprio, computed, 0, outcome, base.value
        )
    ranked = values[finite]
    base_index = finite.index(0) if 0 in finite else int(np.argmax(ranked))  # the base seed's unless beaten
    chosen = finite[select_best_candidate(ranked, base_index=base_index)]
    outcome = PlanningOutcome.COMPLETE if len(indices) == num_candidates else PlanningOutcome.BEST_SO_FAR
    value, states = float(values[chosen]), scored[chosen].states
    return RankedCandidates(
        latents, values, by_depth, actions_by_depth, future_proprio, computed, chosen, outcome, value, states
    )


def _future_proprio(model: PolicyModel, latents: np.ndarray, computed: np.ndarray) -> np.ndarray:
    """The future proprio of the candidates whose action pass finished; NaN for the others. (Their chunks were read
    as they were scored: `actions_by_depth`.)"""
    done = np.flatnonzero(computed)
    every = np.full((len(latents), model.platform.proprio_dim), np.nan, np.float32)
    if done.size:
        every[done] = read_chunks(model, latents[done])[1]
    return every
