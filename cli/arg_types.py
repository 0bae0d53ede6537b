"""argparse types for numbers the commands need within a range, so that a bad value is a usage error naming its flag."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def positive_int(text: str) -> int:
    """An integer above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return value


def int_in_range(low: int, high: int) -> Callable[[str], int]:
    """An integer in low..high."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {text!r}")
        return value

    return parse


def image_size(text: str) -> tuple[int, int]:
    """HEIGHTxWIDTH (or one side, for a square), in pixels, up to 4096 each."""
    sides = text.lower().split("x")
    try:
        values = [int(side) for side in sides]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 2
    if len(values) != 2 or not all(1 <= side <= 4096 for side in values):
        raise argparse.ArgumentTypeError(
            f"expected HEIGHTxWIDTH in pixels (1..4096 each) such as 256x256, got {text!r}"
        )
    return values[0], values[1]


def mebibytes(text: str) -> float:
    """A size in MiB, above zero, up to 4 GiB (libzmq's limit is a C integer)."""
    return _positive_finite(text, "MiB", 4096)


def positive_milliseconds(text: str) -> float:
    """A duration in milliseconds, above zero, up to a day."""
    return _positive_finite(text, "milliseconds", 86_400_000)


def positive_seconds(text: str) -> float:
    """A duration in seconds, above zero, up to a year (waits take a C integer of time)."""
    return _positive_finite(text, "seconds", 31_536_000)


def positive_hertz(text: str) -> float:
    """A rate in Hz, above zero, up to 10 kHz."""
    return _positive_finite(text, "Hz", 10_000)


def factor_of_at_least_one(text: str) -> float:
    """A finite factor of at least 1."""
    value = _positive_finite(text, "times", 1000)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a factor of at least 1, got {text!r}")
    return value


def _positive_finite(text: str, unit: str, most: float) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number of {unit}, got {text!r}")
    if value > most:
        raise argparse.ArgumentTypeError(f"expected at most {most:g} {unit}, got {text!r}")
    return value
