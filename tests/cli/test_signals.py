"""The stop signals of the long-running commands, delivered to this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from cosmos_edge.cli.signals import on_stop_signals, sigterm_interrupts

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@pytest.fixture(autouse=True)
def restored_handlers() -> Iterator[None]:
    original = {number: signal.getsignal(number) for number in SIGNALS}
    yield
    for number, handler in original.items():
        signal.signal(number, handler)


def deliver(number: signal.Signals) -> None:
    os.kill(os.getpid(), number)
    time.sleep(0.01)  # the handler runs on the main thread between two bytecodes: let it


def test_once_a_signal_stopped_the_block_later_ones_are_absorbed_to_the_exit() -> None:
    stops: list[int] = []
    with sigterm_interrupts(), on_stop_signals(stops.append, absorb_after_stop=True):
        deliver(signal.SIGTERM)
    deliver(signal.SIGINT)  # as serve closes its models and the interpreter exits: no KeyboardInterrupt, no kill
    assert stops == [1] and signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGINT)


def test_a_third_stop_signal_ends_a_process_whose_shutdown_hangs() -> None:
    code = (
        "import os, signal, time\n"
        "from cosmos_edge.cli.signals import on_stop_signals\n"
        "with on_stop_signals(lambda signals: None, absorb_after_stop=True):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('absorbed', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"  # a close that hangs
    )
    ended = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (ended.returncode, ended.stdout) == (130, "absorbed\n")
    assert ended.stderr == "cosmos-edge: interrupted while shutting down (a third stop signal)\n"


def test_a_block_no_signal_stopped_puts_the_handlers_back() -> None:
    before = {number: signal.getsignal(number) for number in SIGNALS}
    with sigterm_interrupts(), on_stop_signals(lambda signals: None, absorb_after_stop=True):
        pass
    assert {number: signal.getsignal(number) for number in SIGNALS} == before
