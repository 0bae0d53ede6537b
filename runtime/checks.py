"""Checks of plain values read from files and configurations (manifests, model and controller settings), shared by
every layer. A value of the wrong type or a non-finite one (NaN, infinity) is refused with a `ConfigError` naming the
field when the setting is built, instead of failing later (mid-run, for a control loop)."""

from __future__ import annotations

import math
import numbers

from cosmos_edge.runtime.errors import ConfigError


def is_positive_int(value: object) -> bool:
    """An int above zero; a bool, though an int to Python, is not one."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_number(field: str, value: object, low: float, high: float = math.inf, *, above_low: bool = False) -> None:
    """A finite real number (not a bool) in [low, high], or in (low, high] with `above_low`."""
    number = _as_real(value)
    if number is None or not math.isfinite(number) or not _in_range(number, low, high, above_low):
        raise ConfigError(f"{field}: expected a finite number {_range(low, high, above_low)}, got {describe(value)}")


def check_integer(field: str, value: object, low: int, high: float = math.inf, *, or_none: bool = False) -> None:
    """An integer (not a bool) in [low, high]; also None with `or_none`."""
    if value is None and or_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= int(value) <= high:
        expected = f"an integer {_range(low, high, False)}{' or None' if or_none else ''}"
        raise ConfigError(f"{field}: expected {expected}, got {describe(value)}")


def check_numbers(field: str, value: object, length: int | None = None) -> None:
    """A tuple or list of finite real numbers, of `length` items when given."""
    items = value if isinstance(value, tuple | list) else None
    if items is None or (length is not None and len(items) != length) or not all(_finite(x) for x in items):
        count = "" if length is None else f"{length} "
        raise ConfigError(f"{field}: expected a tuple of {count}finite numbers, got {describe(value)}")


def describe(value: object) -> str:
    """`value` for an error message: its repr, and its type unless it is a plain number."""
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if type(value) in (int, float) else f"{text} ({type(value).__name__})"


def _as_real(value: object) -> float | None:
    """`value` as a float if it is a real number (numpy's included, a bool not), else None."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def _finite(value: object) -> bool:
    number = _as_real(value)
    return number is not None and math.isfinite(number)


def _in_range(value: float, low: float, high: float, above_low: bool) -> bool:
    return (low < value if above_low else low <= value) and value <= high


def _range(low: float, high: float, above_low: bool) -> str:
    if high == math.inf:
        return f"{'>' if above_low else '>='} {low:g}"
    return f"in {'(' if above_low else '['}{low:g}, {high:g}]"
