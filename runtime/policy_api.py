"""The small interface every policy meets (reference, bundle-backed, planning), and its messages.

The robot bridge serves anything that implements `Policy`; wrapping (timing, safety) happens outside.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from cosmos_edge.runtime.platforms import PlatformSpec


@dataclass(frozen=True)
class Observation:
    """One uint8 H×W×3 image per camera of the platform, and the raw (un-normalised) proprio vector."""

    images: Mapping[str, np.ndarray]
    proprio: np.ndarray


@dataclass(frozen=True)
class ActionQuery:
    observation: Observation
    instruction: str
    seed: int = 195
    steps: int | None = None  # None: the platform's default action steps
    return_future_images: bool = False


@dataclass(frozen=True)
class ChunkResult:
    """`actions` is (chunk, action_dim) float32, un-normalised; `value` is in [0, 1].

    `timings_ms` maps stage name to milliseconds, in the order the stages ran.
    """

    actions: np.ndarray
    value: float
    future_proprio: np.ndarray
    future_images: Mapping[str, np.ndarray] | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Policy(Protocol):
    @property
    def platform(self) -> PlatformSpec: ...

    @property
    def instructions(self) -> tuple[str, ...]:
        """Instructions this policy has text embeddings for."""
        ...

    def infer(self, query: ActionQuery) -> ChunkResult: ...

    def reset(self) -> None: ...
