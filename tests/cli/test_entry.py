"""The console script: a signal before a command runs ends it as it does later (exit 130, one line)."""

from __future__ import annotations

import os
import signal
import sys
import types
from collections.abc import Callable

import pytest

from cosmos_edge.cli import entry


def run_with(main: Callable[[], int], monkeypatch: pytest.MonkeyPatch) -> object:
    """The exit code of the console script running `main` in place of the command's (its SIGTERM handler undone)."""
    monkeypatch.setitem(sys.modules, "cosmos_edge.cli.main", types.SimpleNamespace(main=main))
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    # Python's own Ctrl-C handler, as a console script started from a terminal has it (a shell starts a background
    # job with SIGINT ignored, and Python then installs none).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as ended:
            entry.run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return ended.value.code


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_command_loads_exits_130_in_one_line(
    signum: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def loading() -> int:  # signalled as the command's modules import
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal did not interrupt")

    assert run_with(loading, monkeypatch) == 130
    assert capsys.readouterr().err == "cosmos-edge: interrupted\n"


def test_the_commands_exit_code_is_the_processs(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_with(lambda: 2, monkeypatch) == 2
