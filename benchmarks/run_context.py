"""The context every recorded number carries: the machine it ran on and the commit it measured."""

from __future__ import annotations

import os
import platform as host
import subprocess
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    """The processor (or architecture) and its logical CPUs."""
    return f"{host.processor() or host.machine()}, {os.cpu_count()} logical CPUs"


def commit() -> str:
    """The short commit of the working tree, `-dirty` when it has uncommitted changes to tracked files; `unknown`
    outside a git checkout (a device machine's copy)."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if changed else "")


def _git(*arguments: str) -> str:
    finished = subprocess.run(["git", *arguments], cwd=_ROOT, capture_output=True, text=True, check=True, timeout=30)
    return finished.stdout.strip()
