"""Checks of plain values read from files and configurations (manifests, model configs), shared by every layer."""

from __future__ import annotations


def is_positive_int(value: object) -> bool:
    """An int above zero; a bool, though an int to Python, is not one."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
