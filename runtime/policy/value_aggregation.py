"""Aggregation of value predictions in model-based planning, and best-of-N candidate selection.

Official source: `cosmos_utils.aggregate_value_predictions` (ensemble schemes over the value samples of one
candidate) and the ALOHA `deploy.py` server (search-depth schemes over the per-depth values, and the selection).
Values are the decoded [0, 1] predictions, float32 in the official code: the success threshold is compared in
float32 as torch does; means are taken in float64, so they can differ from the official float32 reductions in the
last bits, and two candidates within one float32 step of each other can rank differently (so can they on two GPUs
of the official server: a GPU's float32 reduction order is its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np

from cosmos_edge.runtime.errors import InputError

SUCCESS_THRESHOLD = np.float32(0.05)  # torch casts the Python 0.05 to the float32 dtype of the values
LCB_BETA = 1.0


class ValueAggregation(str, Enum):
    MAJORITY_MEAN = "majority_mean"
    """Mean of the values above the threshold if at least half are above it, else 0 (main ALOHA planning)."""
    AVERAGE = "average"
    """Mean (ensemble scheme, and the search-depth `average` scheme)."""
    LCB = "lcb"
    """Mean − 1·std, unbiased std (torch default); needs two or more values."""
    SUCCESS_VOTE = "success_vote"
    """Fraction of values above the threshold."""


def _as_values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise InputError(f"values: expected a non-empty 1-D sequence, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"values: expected finite numbers, got {array.tolist()}")
    return array


def aggregate_values(values: Sequence[float] | np.ndarray, scheme: ValueAggregation) -> float:
    """One value from an ensemble of value predictions (or, `average`, from a search path), clipped to [0, 1].

    The official code clips only the ensemble schemes; the search-depth `average` sees values that were clipped at
    extraction, so clipping it too changes nothing.
    """
    array = _as_values(values)
    wide = array.astype(np.float64)
    success = array > SUCCESS_THRESHOLD
    if scheme is ValueAggregation.MAJORITY_MEAN:
        # Official: float32 success_ratio >= 0.5; exactly 2·count >= total, as 0.5 is exact and rounding monotonic.
        aggregated = float(wide[success].mean()) if 2 * int(success.sum()) >= array.size else 0.0
    elif scheme is ValueAggregation.AVERAGE:
        aggregated = float(wide.mean())
    elif scheme is ValueAggregation.LCB:
        if array.size < 2:
            # torch.std of one sample is NaN, which the official code would pass on as the value.
            raise InputError(f"values: the lcb scheme needs at least 2 values, got {array.size}")
        aggregated = float(wide.mean() - LCB_BETA * wide.std(ddof=1))
    else:
        aggregated = float(success.mean())
    return min(max(aggregated, 0.0), 1.0)


def select_best_candidate(values: Sequence[float] | np.ndarray, base_index: int = 0) -> int:
    """Index of the candidate to execute: the base-seed candidate unless another is strictly better.

    Among equally good better candidates the first wins (Python `max` over the seeds in query order).
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.isfinite(array).all():
        raise InputError(f"values: expected a non-empty 1-D sequence of finite numbers, got {np.asarray(values)!r}")
    if not 0 <= base_index < array.size:
        raise InputError(f"base_index: expected 0 <= base_index < {array.size}, got {base_index}")
    best = int(np.argmax(array))
    return best if array[best] > array[base_index] else base_index
