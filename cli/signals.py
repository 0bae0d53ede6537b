"""Signals of the long-running commands (`serve`, `robot`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts as Ctrl-C does for the block (`main` runs every command in it: an export, models loading,
    arms moving to their start pose, until a command takes the signals over): what is open closes, and the process
    exits with a line, not by the signal."""
    if threading.current_thread() is not threading.main_thread():  # embedded: signals are the caller's
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is interrupt:  # not a stop's `absorb_after_stop`, held to the exit
            signal.signal(signal.SIGTERM, previous)


_SIGNALS_TO_EXIT = 3  # with `absorb_after_stop`: the signal that ends the process at once, whatever it does


@contextlib.contextmanager
def on_stop_signals(
    stop: Callable[[int], None], *, second_interrupts: bool = False, absorb_after_stop: bool = False
) -> Iterator[None]:
    """SIGINT and SIGTERM call `stop` with how many of them came so far (1 for the first; it must only set flags: it
    runs in a signal handler) for the block; the handlers before it are put back after. Off the main thread
    (embedded), signals are the caller's.

    `second_interrupts`: a second signal raises KeyboardInterrupt, as Ctrl-C does, for an operator whose stop waits
    on something that hangs (a rig's `step` stuck in its driver). `absorb_after_stop`: once a signal stopped the
    block, later ones are absorbed to the process's exit, so a clean shutdown that was asked for is not cut short in
    its last moments (closing the models, the interpreter's exit) by an impatient second signal; a third one in all
    ends the process at once (exit 130), for a close that hangs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = 0

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals > 1 and second_interrupts:
            raise KeyboardInterrupt
        stop(signals)

    def absorb(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals >= _SIGNALS_TO_EXIT:
            os.write(sys.stderr.fileno(), b"cosmos-edge: interrupted while shutting down (a third stop signal)\n")
            os._exit(130)

    numbers = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.signal(number, handle) for number in numbers}
    try:
        yield
    finally:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)  # none between the two swaps: both or neither
        try:
            for number, handler in previous.items():
                signal.signal(number, absorb if signals and absorb_after_stop else handler)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
