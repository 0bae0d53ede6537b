"""Signals of the long-running commands (`serve`, `robot`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts as Ctrl-C does for the block (while models load, or arms move to their start pose, before
    a command takes the signals over): what is open closes, and the process exits with a line, not by the signal."""
    if threading.current_thread() is not threading.main_thread():  # embedded: signals are the caller's
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
