import math

import numpy as np
import pytest

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.policy.value_aggregation import ValueAggregation, aggregate_values, select_best_candidate


def f32(value: float) -> float:
    """The float32 value the official tensors hold, widened exactly."""
    return float(np.float32(value))


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.9, 0.7, 0.01, 0.0], (f32(0.9) + f32(0.7)) / 2),  # half succeed: mean of the successes
        ([0.9, 0.01, 0.02], 0.0),  # minority succeed
        ([0.6, 0.8, 0.7, 0.04, 0.5], (f32(0.6) + f32(0.8) + f32(0.7) + f32(0.5)) / 4),
        ([0.05, 0.05, 0.3], 0.0),  # 0.05 itself is not above the threshold
        ([0.0, 0.0], 0.0),
    ],
)
def test_majority_mean(values: list[float], expected: float) -> None:
    assert aggregate_values(values, ValueAggregation.MAJORITY_MEAN) == pytest.approx(expected, abs=1e-15)


def test_threshold_is_compared_in_float32() -> None:
    # float32(0.05) is 0.0500000007; a float64 0.05000000001 rounds onto it and is not above it.
    assert aggregate_values([0.05000000001], ValueAggregation.SUCCESS_VOTE) == 0.0
    assert aggregate_values([0.0500001], ValueAggregation.SUCCESS_VOTE) == 1.0


def test_average() -> None:
    assert aggregate_values([0.2, 0.4, 0.9], ValueAggregation.AVERAGE) == pytest.approx((0.2 + 0.4 + 0.9) / 3, abs=1e-7)


def test_lcb_uses_unbiased_std() -> None:
    values = [0.2, 0.4, 0.9]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert aggregate_values(values, ValueAggregation.LCB) == pytest.approx(mean - std, abs=1e-7)


def test_lcb_is_clipped_at_zero_and_needs_two_values() -> None:
    assert aggregate_values([0.0, 1.0], ValueAggregation.LCB) == 0.0  # 0.5 − 0.707
    with pytest.raises(InputError, match=ValueAggregation.LCB):
        aggregate_values([0.5], ValueAggregation.LCB)


def test_success_vote_is_fraction_above_threshold() -> None:
    assert aggregate_values([0.9, 0.01, 0.3, 0.05], ValueAggregation.SUCCESS_VOTE) == 0.5


def test_results_are_clipped_to_unit_interval() -> None:
    assert aggregate_values([1.5, 1.2], ValueAggregation.AVERAGE) == 1.0


@pytest.mark.parametrize("values", [[], [[0.1, 0.2]], [0.3, float("nan")]])
def test_malformed_values_are_rejected(values: list) -> None:
    with pytest.raises(InputError, match="values"):
        aggregate_values(values, ValueAggregation.AVERAGE)


@pytest.mark.parametrize(
    ("values", "base_index", "expected"),
    [
        ([0.5, 0.5, 0.4], 0, 0),  # a tie keeps the base seed
        ([0.5, 0.7, 0.7], 0, 1),  # the first of equally good better candidates
        ([0.2, 0.1, 0.3], 0, 2),
        ([0.2, 0.9, 0.3], 2, 1),
        ([0.0, 0.0, 0.0], 1, 1),
    ],
)
def test_select_best_candidate(values: list[float], base_index: int, expected: int) -> None:
    assert select_best_candidate(values, base_index) == expected


def test_select_best_candidate_rejects_bad_base_index() -> None:
    with pytest.raises(InputError, match="base_index"):
        select_best_candidate([0.1, 0.2], base_index=2)
