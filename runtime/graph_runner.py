"""The one interface every engine backend meets: run a fixed-shape graph of a bundle on host arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np

from cosmos_edge.runtime.graph_specs import GraphSpec


class GraphRunner(Protocol):
    """Runs one graph whose I/O is `spec`. Outputs are new arrays owned by the caller.

    An input that stays the same over many calls (the instruction's text embedding) is given once with
    `set_constant_input` (device backends upload it once) and left out of `run`'s inputs from then on.
    Runners hold engine resources (sessions, device buffers, CUDA graphs): release them with `close()`.
    """

    @property
    def spec(self) -> GraphSpec: ...

    def set_constant_input(self, name: str, array: np.ndarray) -> None: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...
