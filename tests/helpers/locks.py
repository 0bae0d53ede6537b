"""A lock held by another process, as another `export`, `engines build` or TensorRT build would hold it."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

_HOLD = """
import sys
from pathlib import Path
from cosmos_edge.runtime.files import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()  # until told to let go
"""


class LockHolder:
    """The process holding the lock; `release()` lets go (and waits for it to)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self._process = process

    def release(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write("done\n")
        self._process.stdin.flush()


@contextlib.contextmanager
def held_elsewhere(lock: Path) -> Iterator[LockHolder]:
    """`lock` held by another process for the block (or until released); it is killed after the block."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "held\n"
        yield LockHolder(process)
    finally:
        process.kill()
        process.wait()
