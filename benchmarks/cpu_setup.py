"""What the CPU benchmarks share: the machine they report, and the ALOHA query they time."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from benchmarks import run_context
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import ActionQuery, Observation

ALOHA = platform_spec("aloha")


def machine_info() -> dict[str, Any]:
    """The machine, torch and its threads, for a benchmark's `extra_info`."""
    return {
        "machine": run_context.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def aloha_query(steps: int | None = None) -> ActionQuery:
    """Three 480x640 camera frames and a proprio vector, seeded, with the official seed."""
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for name in ALOHA.cameras}
    observation = Observation(images, rng.uniform(-0.2, 0.2, ALOHA.proprio_dim).astype(np.float32))
    return ActionQuery(observation, "fold the t-shirt", seed=195, steps=steps)
