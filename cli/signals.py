"""Signals of the long-running commands (`serve`, `robot`)."""

from __future__ import annotations

import contextlib
import signal
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
        if signal.getsignal(signal.SIGTERM) is interrupt:  # not a stop's `then_ignore`, which holds to the exit
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def on_stop_signals(
    stop: Callable[[], None], *, second_interrupts: bool = False, then_ignore: bool = False
) -> Iterator[None]:
    """SIGINT and SIGTERM call `stop` (which must only set flags: it runs in a signal handler) for the block; the
    handlers before it are put back after. Off the main thread (embedded), signals are the caller's.

    `second_interrupts`: a second signal raises KeyboardInterrupt, as Ctrl-C does, for an operator whose stop waits
    on something that hangs (a rig's `step` stuck in its driver). `then_ignore`: once a signal stopped the block,
    both are ignored after it, to the process's exit: a clean shutdown that was asked for is not cut short in its
    last moments (closing the models, the interpreter's exit) by an impatient second signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signalled = False

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal signalled
        if signalled and second_interrupts:
            raise KeyboardInterrupt
        signalled = True
        stop()

    previous = {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_IGN if signalled and then_ignore else handler)
