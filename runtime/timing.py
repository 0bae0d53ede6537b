"""Per-stage wall-clock timing of one query, in the order the stages ran."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StageTimer:
    """Accumulates milliseconds per stage name; a stage entered twice adds up."""

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - start) * 1e3)

    def add(self, name: str, milliseconds: float) -> None:
        self._ms[name] = self._ms.get(name, 0.0) + milliseconds

    def as_dict(self) -> dict[str, float]:
        return dict(self._ms)
