"""`exclusive_lock` between processes: what keeps two `engines build` runs off one manifest, and two processes from
building one TensorRT engine twice."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from cosmos_edge.runtime.files import exclusive_lock

HOLD = """
import sys
from pathlib import Path
from cosmos_edge.runtime.files import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says
"""


def test_another_process_holding_the_lock_is_waited_for_or_reported(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with exclusive_lock(lock, wait=False) as held:
            assert not held  # `engines build` refuses to run beside another
        waited = threading.Event()

        def release() -> None:  # once this process says it waits, the holder lets go
            waited.set()
            assert holder.stdin is not None
            holder.stdin.write("done\n")
            holder.stdin.flush()

        with exclusive_lock(lock, on_wait=release) as held:
            assert held and waited.is_set()
    finally:
        holder.kill()
        holder.wait()


def test_a_holder_that_was_killed_leaves_the_lock_free(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
    holder.kill()
    holder.wait()
    with exclusive_lock(lock, wait=False) as held:
        assert held
