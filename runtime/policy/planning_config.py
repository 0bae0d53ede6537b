"""The official planning options (ALOHA `deploy.py` `DeployConfig`), their presets and the step lists they imply.

Field names are the official ones. Combinations the official server accepts at start-up but answers with "error" on
every request are refused here when the configuration is made (`deploy.py` lines 423, 432, 472, 476-480):
`ar_value_prediction` without `ar_future_prediction`, `ar_future_prediction` with no value pass, and
`search_depth` > 1 without the world-model and value passes; and the `lcb` scheme over a single value, for which the
official code would compute a NaN standard deviation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

import numpy as np

from cosmos_edge.runtime.checks import is_positive_int
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED
from cosmos_edge.runtime.policy.conditioning import ConditioningMode
from cosmos_edge.runtime.policy.value_aggregation import ValueAggregation


class FutureStateAggregation(str, Enum):
    """How the future images of an ensemble are combined: they only shape the returned images, never a value."""

    AVERAGE = "average"
    LAST = "last"


class DepthAggregation(str, Enum):
    USE_LAST_VALUE = "use_last_value"
    """The value of the last branch at the deepest level."""
    AVERAGE = "average"
    """Mean over every entry of the per-depth list (all depths and branches, unweighted)."""


# The largest value of each count option. The official configurations stay far below (8 candidates over 8 GPUs,
# ensembles of 3 and 5, depth 3); the cost of a query grows with their product, so a larger value is a typo that
# would otherwise make every query run for hours.
COUNT_LIMITS: dict[str, int] = {
    "num_queries_best_of_n": 64,
    "num_denoising_steps_action": MAX_DENOISING_STEPS,
    "num_denoising_steps_future_state": MAX_DENOISING_STEPS,
    "num_denoising_steps_value": MAX_DENOISING_STEPS,
    "num_future_state_predictions_in_ensemble": 16,
    "num_value_predictions_in_ensemble": 16,
    "search_depth": 8,
}

# The schemes each scheme option accepts.
SCHEME_CHOICES: dict[str, tuple[Enum, ...]] = {
    "future_state_ensemble_aggregation_scheme": tuple(FutureStateAggregation),
    "value_ensemble_aggregation_scheme": tuple(ValueAggregation),
    "search_depth_value_aggregation_scheme": tuple(DepthAggregation),
}


@dataclass(frozen=True)
class PlanningConfig:
    """Best-of-N planning. Defaults: the official "main planning config" (`deploy.py` docstring, lines 52-94).

    `num_denoising_steps_action` None: the platform's default action steps (ALOHA's 10, as the main config; 5 for
    LIBERO and RoboCasa, as their official evaluations)."""

    num_queries_best_of_n: int = 8
    num_denoising_steps_action: int | None = None
    num_denoising_steps_future_state: int = 5
    num_denoising_steps_value: int = 5
    use_ensemble_future_state_predictions: bool = True
    num_future_state_predictions_in_ensemble: int = 3
    future_state_ensemble_aggregation_scheme: FutureStateAggregation = FutureStateAggregation.AVERAGE
    use_ensemble_value_predictions: bool = True
    num_value_predictions_in_ensemble: int = 5
    value_ensemble_aggregation_scheme: ValueAggregation = ValueAggregation.MAJORITY_MEAN
    ar_future_prediction: bool = True
    ar_value_prediction: bool = True
    ar_qvalue_prediction: bool = False
    mask_future_state_for_qvalue_prediction: bool = False
    mask_current_state_action_for_value_prediction: bool = True
    search_depth: int = 1
    search_depth_value_aggregation_scheme: DepthAggregation = DepthAggregation.USE_LAST_VALUE
    randomize_seed: bool = False

    def __post_init__(self) -> None:
        for name, limit in COUNT_LIMITS.items():
            value = getattr(self, name)
            if name == "num_denoising_steps_action" and value is None:
                continue
            if not (is_positive_int(value) and value <= limit):
                raise ConfigError(f"{name}: expected an integer in 1..{limit}, got {value!r}")
        for name, choices in SCHEME_CHOICES.items():
            value = getattr(self, name)
            chosen = next((choice for choice in choices if choice == value), None)  # str enums equal their value
            if chosen is None:
                raise ConfigError(f"{name}: expected one of {[choice.value for choice in choices]}, got {value!r}")
            object.__setattr__(self, name, chosen)
        if self.ar_value_prediction and not self.ar_future_prediction:
            raise ConfigError("ar_value_prediction: needs ar_future_prediction (its value is of the predicted state)")
        if self.ar_future_prediction and not (self.ar_value_prediction or self.ar_qvalue_prediction):
            raise ConfigError("ar_future_prediction: needs ar_value_prediction or ar_qvalue_prediction to score it")
        if self.search_depth > 1 and not (self.ar_future_prediction and self.ar_value_prediction):
            raise ConfigError("search_depth: above 1 needs ar_future_prediction and ar_value_prediction")
        if self.search_depth > 1 and self.ar_qvalue_prediction:  # deploy.py 476-478 asserts it, for every request
            raise ConfigError("search_depth: above 1 is not supported with ar_qvalue_prediction (as officially)")
        lcb = self.value_ensemble_aggregation_scheme is ValueAggregation.LCB
        if self.pools_value_ensemble and lcb and self.pooled_values() < 2:
            pools_states = self.ar_value_prediction and self.use_ensemble_future_state_predictions
            more = "num_value_predictions_in_ensemble" + " or num_future_state_predictions_in_ensemble" * pools_states
            raise ConfigError(
                "value_ensemble_aggregation_scheme: lcb needs 2 or more values to pool, and this configuration pools 1 "
                f"(raise {more})"
            )

    @property
    def scores_with_planning_model(self) -> bool:
        """False: candidates are ranked by the value of their own action pass (no planning model involved)."""
        return self.ar_value_prediction or self.ar_qvalue_prediction

    @property
    def pools_value_ensemble(self) -> bool:
        """Whether `value_ensemble_aggregation_scheme` applies: a value ensemble of the planning model is pooled."""
        return self.scores_with_planning_model and self.use_ensemble_value_predictions

    @property
    def predicts_future_images(self) -> bool:
        """Whether a query asking for future images gets any: not from Q(s, a) planning without a world model, whose
        passes predict no state (deploy.py 388-423 returns none)."""
        return self.ar_value_prediction or self.ar_future_prediction or not self.ar_qvalue_prediction

    def unused_options(self) -> dict[str, str]:
        """The options whose values cannot change what this configuration computes, each with why (for a warning:
        a flag that does nothing is likely a misunderstanding)."""
        unused: dict[str, str] = {}

        def mark(names: tuple[str, ...], why: str) -> None:
            for name in names:
                unused.setdefault(name, why)

        future = ("use_ensemble_future_state_predictions", "num_future_state_predictions_in_ensemble")
        future_scheme, future_steps = (
            ("future_state_ensemble_aggregation_scheme",),
            ("num_denoising_steps_future_state",),
        )
        one_member = "an ensemble of one takes 1 step (the official linspace(1, steps, 1))"
        if not self.ar_future_prediction:
            mark(future + future_scheme + future_steps, "no world-model pass runs (ar_future_prediction is off)")
        elif not self.use_ensemble_future_state_predictions:
            mark(future[1:] + future_scheme, "use_ensemble_future_state_predictions is off")
        elif self.num_future_state_predictions_in_ensemble == 1:
            mark(future_steps, one_member)
            mark(future_scheme, "an ensemble of one has nothing to aggregate")
        values = ("use_ensemble_value_predictions", "num_value_predictions_in_ensemble")
        value_scheme, value_steps = ("value_ensemble_aggregation_scheme",), ("num_denoising_steps_value",)
        masks = ("mask_current_state_action_for_value_prediction", "mask_future_state_for_qvalue_prediction")
        if not self.scores_with_planning_model:
            why = (
                "candidates are ranked by their own action pass (ar_value_prediction and ar_qvalue_prediction are off)"
            )
            mark(values + value_scheme + value_steps + masks, why)
        else:
            if not self.use_ensemble_value_predictions:
                mark(values[1:] + value_scheme, "use_ensemble_value_predictions is off")
            elif self.num_value_predictions_in_ensemble == 1:
                mark(value_steps, one_member)
            if self.ar_value_prediction:
                v_ranks = "V(s') ranks (ar_value_prediction is on), first, as officially"
                mark(("ar_qvalue_prediction",), v_ranks)
                mark(masks[1:], f"it masks Q(s, a) passes, and {v_ranks}")
            else:
                mark(masks[:1], "it masks V(s') passes, and ar_value_prediction is off")
        if self.search_depth == 1:
            mark(("search_depth_value_aggregation_scheme",), "search_depth is 1")
        return unused

    @property
    def value_mode(self) -> ConditioningMode:
        """The conditioning of a value pass: V(s') or V(s, a, s') after a world-model pass, else Q(s, a)."""
        if self.ar_value_prediction:
            masked = self.mask_current_state_action_for_value_prediction
            return ConditioningMode.VALUE_FUTURE_STATE if masked else ConditioningMode.VALUE
        return ConditioningMode.Q_VALUE if self.mask_future_state_for_qvalue_prediction else ConditioningMode.VALUE

    def future_steps(self) -> tuple[int, ...]:
        """Denoising steps of each world-model pass; the j-th uses seed s + j."""
        if not self.use_ensemble_future_state_predictions:
            return (self.num_denoising_steps_future_state,)
        return ensemble_steps(self.num_denoising_steps_future_state, self.num_future_state_predictions_in_ensemble)

    def value_entries(self) -> int:
        """Entries of a candidate's official `value_predictions_by_depth`: 1 for the first level, then one per
        predicted state (`future_steps()`) at each deeper level."""
        return 1 + (self.search_depth - 1) * len(self.future_steps())

    def pooled_values(self) -> int:
        """Values the value ensemble pools for a candidate at each level: every value pass of every predicted state
        (for Q(s, a), of the action pass alone)."""
        states = len(self.future_steps()) if self.ar_value_prediction else 1
        return states * len(self.value_steps())

    def largest_seed_offset(self) -> int:
        """The most a pass adds to the query's seed: candidate i takes s + i, and its ensemble members s + i + j
        (world-model members only where world-model passes run: for V, or for Q's future images)."""
        members = 1
        if self.scores_with_planning_model:
            members = len(self.value_steps())
            if self.ar_value_prediction or self.ar_future_prediction:
                members = max(members, len(self.future_steps()))
        return self.num_queries_best_of_n - 1 + members - 1

    def check_seed(self, seed: int) -> None:
        """Raises `InputError` (field "seed") for a query seed whose passes would pass the last 32-bit seed (none is
        used when `randomize_seed`)."""
        highest = MAX_SEED - self.largest_seed_offset()
        if not self.randomize_seed and not 0 <= seed <= highest:
            raise InputError(
                f"seed: expected 0..{highest} with this planning configuration (its passes use seeds up to seed + "
                f"{self.largest_seed_offset()}), got {seed}",
                field="seed",
            )

    def value_steps(self) -> tuple[int, ...]:
        """Denoising steps of each value pass of one state; the k-th uses seed s + k."""
        if not self.use_ensemble_value_predictions:
            return (self.num_denoising_steps_value,)
        return ensemble_steps(self.num_denoising_steps_value, self.num_value_predictions_in_ensemble)


def ensemble_steps(steps: int, members: int) -> tuple[int, ...]:
    """The official `np.linspace(1, steps, members).astype(int)` (cosmos_utils.py 1329-1333, 1482-1484): the first
    member always takes 1 step, and an ensemble of one takes 1, not `steps`."""
    return tuple(int(value) for value in np.linspace(1, steps, members).astype(int))


# deploy.py lines 213-218 and 232-252: `DeployConfig`'s own field defaults, so that an official command line maps
# flag for flag (without them, an official flag left out would take the main config's value instead).
_DEPLOY_DEFAULTS = PlanningConfig(
    num_queries_best_of_n=1,
    num_denoising_steps_future_state=1,
    num_denoising_steps_value=1,
    use_ensemble_future_state_predictions=False,
    use_ensemble_value_predictions=False,
    value_ensemble_aggregation_scheme=ValueAggregation.AVERAGE,
    ar_future_prediction=False,
    ar_value_prediction=False,
    mask_current_state_action_for_value_prediction=False,
)

PRESETS: dict[str, PlanningConfig] = {
    # deploy.py lines 52-94: V(s') with a 3 x 5 ensemble, majority_mean, best of 8.
    "main": PlanningConfig(),
    # deploy.py lines 96-137: the same without ensembles, searching three levels deep, the last level's value.
    "depth3": PlanningConfig(
        search_depth=3,
        use_ensemble_value_predictions=False,
        num_value_predictions_in_ensemble=1,
        value_ensemble_aggregation_scheme=ValueAggregation.AVERAGE,
        use_ensemble_future_state_predictions=False,
        num_future_state_predictions_in_ensemble=1,
    ),
    # deploy.py lines 26-50 ("base Cosmos Policy only"): one candidate scored by its own action pass. Its planning
    # flags are the defaults' values, so every flag added to it means what it means on the official base command.
    "base": _DEPLOY_DEFAULTS,
    "deploy-defaults": _DEPLOY_DEFAULTS,
}


def planning_preset(name: str, **overrides: object) -> PlanningConfig:
    """A preset with some official options replaced (`dataclasses.replace` field names)."""
    if name not in PRESETS:
        raise ConfigError(f"planning preset: expected one of {sorted(PRESETS)}, got {name!r}")
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(PlanningConfig)})
    if unknown:
        raise ConfigError(f"planning options: unknown {unknown}")
    return dataclasses.replace(PRESETS[name], **overrides)  # type: ignore[arg-type]
