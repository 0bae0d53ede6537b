"""The control loop's ticks: their records (a ring buffer), the summary of a run, the sleep that wakes on time, and
the thread priority that keeps it on time."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_LOG = logging.getLogger(__name__)

SPIN_MARGIN_S = 0.002  # see `precise_sleep`
NO_CHUNK = -1  # `chunk_obs_id` / `action_index` of a tick record that commanded the hold pose


TICK_DTYPE = np.dtype(
    [
        ("tick", np.int64),
        ("deadline_ns", np.int64),
        ("wake_ns", np.int64),  # jitter = wake_ns - deadline_ns
        ("command_ns", np.int64),  # when robot.command returned
        ("missed", np.int32),  # deadlines skipped right before this tick
        ("chunk_obs_id", np.int64),  # NO_CHUNK when holding
        ("action_index", np.int32),  # NO_CHUNK when holding
        ("flags", np.uint8),  # safety Intervention bits
        ("adopted", np.bool_),  # a new chunk replaced the old one this tick
        ("requested", np.bool_),  # an inference request was submitted this tick
    ]
)


class TickLog:
    """Bounded ring buffer of per-tick records (`TICK_DTYPE`), allocated once."""

    def __init__(self, capacity: int) -> None:
        self._buf = np.zeros(capacity, dtype=TICK_DTYPE)
        self._count = 0
        self._lock = threading.Lock()

    def append(self, *values: int | bool) -> None:
        """One record, its values in `TICK_DTYPE` field order."""
        with self._lock:
            self._buf[self._count % len(self._buf)] = values
            self._count += 1

    def snapshot(self) -> np.ndarray:
        """The kept records, oldest first (a copy)."""
        with self._lock:
            n, cap = self._count, len(self._buf)
            if n <= cap:
                return self._buf[:n].copy()
            start = n % cap
            return np.concatenate([self._buf[start:], self._buf[:start]])


@dataclass(frozen=True)
class TickSummary:
    ticks: int
    missed_ticks: int
    hold_ticks: int
    jitter_p50_ms: float
    jitter_p99_ms: float
    jitter_max_ms: float


def jitter_ms(records: np.ndarray) -> tuple[float, float, float]:
    """p50, p99 and max of how late ticks started against their deadlines, over `TickLog.snapshot()` records."""
    if not len(records):
        return 0.0, 0.0, 0.0
    late_ms = (records["wake_ns"] - records["deadline_ns"]) / 1e6
    p50, p99 = np.percentile(late_ms, [50, 99])
    return float(p50), float(p99), float(late_ms.max())


def precise_sleep(seconds: float) -> None:
    """`time.sleep` until `SPIN_MARGIN_S` before the end, then spin.

    A thread already running at the deadline does not wait for the scheduler to wake it, which takes
    about 0.1 ms on an idle machine and several ms while inference loads the cores. The spin costs up to
    `SPIN_MARGIN_S` of one core per tick (5% at 25 Hz) and holds the GIL meanwhile.
    """
    end = time.perf_counter() + seconds
    if seconds > SPIN_MARGIN_S:
        time.sleep(seconds - SPIN_MARGIN_S)
    while time.perf_counter() < end:
        pass


@contextlib.contextmanager
def thread_priority(realtime_priority: int | None, nice: int | None) -> Iterator[None]:
    """Raise the calling thread's priority for the block; Linux applies both calls with id 0 per thread."""
    with contextlib.ExitStack() as restore:
        if realtime_priority is not None:
            try:
                previous = (os.sched_getscheduler(0), os.sched_getparam(0))
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(realtime_priority))
                restore.callback(_restore, "scheduling policy", os.sched_setscheduler, 0, *previous)
                nice = None  # FIFO threads ignore niceness
            except (AttributeError, OSError) as e:  # not Linux, or not permitted
                _LOG.warning("executor: SCHED_FIFO %d refused (%s)", realtime_priority, e)
        if nice is not None:
            try:
                previous_nice = os.getpriority(os.PRIO_PROCESS, 0)
                os.setpriority(os.PRIO_PROCESS, 0, nice)
                restore.callback(_restore, "niceness", os.setpriority, os.PRIO_PROCESS, 0, previous_nice)
            except (AttributeError, OSError) as e:
                _LOG.warning("executor: nice %d refused (%s); using the normal priority", nice, e)
        yield


def _restore(what: str, call: Callable[..., None], *args: Any) -> None:
    """Restores a thread setting after a run; without privilege a raised niceness cannot be lowered back."""
    try:
        call(*args)
    except OSError as error:
        _LOG.warning("executor: could not restore the control thread's %s (%s); it stays as set", what, error)
