"""The stop signals of the long-running commands, delivered to this process."""

from __future__ import annotations

import os
import signal
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


def test_once_a_signal_stopped_the_block_both_are_ignored_to_the_exit() -> None:
    stops: list[int] = []
    with sigterm_interrupts(), on_stop_signals(lambda: stops.append(1), then_ignore=True):
        deliver(signal.SIGTERM)
    for number in SIGNALS:  # as serve closes its models and the interpreter exits: no KeyboardInterrupt, no kill
        deliver(number)
        assert signal.getsignal(number) is signal.SIG_IGN
    assert stops == [1]


def test_a_block_no_signal_stopped_puts_the_handlers_back() -> None:
    before = {number: signal.getsignal(number) for number in SIGNALS}
    with sigterm_interrupts(), on_stop_signals(lambda: None, then_ignore=True):
        pass
    assert {number: signal.getsignal(number) for number in SIGNALS} == before
