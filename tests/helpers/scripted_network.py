"""A DiT double for planning tests: it records every sampling pass and scripts the value each pass predicts.

A pass starts with a network call at σ = 80 (its generated frames enter with timestep bf16(80/81)). From that call
the double reads the clean slots of its conditioning mask (WORLD_MODEL and a masked Q_VALUE pass share them: both
condition on blank, current state and action) and each batch row's seed (its initial noise, a
RandomState draw, identifies it); it counts the calls until the next pass. With `value_of`, the velocity it returns
makes the x0 of each call's value slot `2·value − 1`, so a 1-step pass reads back that value (a multi-step pass's
last call is at σ = 4, whose t the double does not know exactly: script values with 1-step passes only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.conditioning import ConditioningMode, clean_slots
from cosmos_edge.runtime.policy.numerics import round_to_bf16
from cosmos_edge.runtime.policy.sampler import SIGMA_MAX, initial_noise

ValueOf = Callable[[int, tuple[int, ...]], float]  # (seed, clean slots of the pass) -> value in [0, 1]
_T_MAX = np.float32(SIGMA_MAX) / (np.float32(SIGMA_MAX) + np.float32(1.0))  # as the sampler computes it


def slots(platform: PlatformSpec, mode: ConditioningMode) -> tuple[int, ...]:
    return clean_slots(platform, mode)


@dataclass
class Pass:
    clean_slots: tuple[int, ...]
    seeds: list[int]
    calls: int = 1
    clean: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))  # the first call's x_in


@lru_cache(maxsize=4)
def _seed_table(num_latent_frames: int, value_slot: int, seeds: range) -> dict[float, int]:
    """The scaled first noise value of the value slot → the seed that drew it."""
    shape = (1, 16, num_latent_frames, 28, 28)
    probe = (0, 0, value_slot, 0, 0)  # the value slot is generated in every mode
    scale = np.float32(1.0) - _T_MAX
    return {float(initial_noise(seed, shape)[probe] * scale): seed for seed in seeds}


class ScriptedNetwork:
    """`DenoisingNetwork` double. `passes` lists what ran, in order; the seeds it can identify are `seeds`."""

    def __init__(self, platform: PlatformSpec, value_of: ValueOf | None = None, seeds: range = range(700)) -> None:
        self.platform = platform
        self.value_of = value_of
        self.passes: list[Pass] = []
        self._seed_of = _seed_table(platform.num_latent_frames, platform.value_slot, seeds)

    def bind_text(self, text_embedding: np.ndarray) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        return self._call

    def _call(self, x: np.ndarray, timesteps: np.ndarray, condition_mask: np.ndarray) -> np.ndarray:
        value_slot = self.platform.value_slot
        if timesteps[0, value_slot] == round_to_bf16(np.array([_T_MAX]))[0]:
            clean = tuple(int(slot) for slot in np.flatnonzero(condition_mask[0, 0, :, 0, 0]))
            seeds = [self._seed_of[float(row[0, value_slot, 0, 0])] for row in x]
            self.passes.append(Pass(clean, seeds, clean=x.copy()))
        else:
            self.passes[-1].calls += 1
        velocity = np.zeros_like(x)
        if self.value_of is not None:
            current = self.passes[-1]
            targets = np.array([2 * self.value_of(seed, current.clean_slots) - 1 for seed in current.seeds], np.float32)
            velocity[:, :, value_slot] = (x[:, :, value_slot] - targets[:, None, None, None]) / _T_MAX
        return velocity
