"""`exclusive_lock` between processes: what keeps two `engines build` runs off one manifest, two processes from
building one TensorRT engine twice, and an export from removing a running one's staging folder."""

from __future__ import annotations

import threading
from pathlib import Path

from cosmos_edge.runtime.files import exclusive_lock
from tests.helpers.locks import held_elsewhere


def test_another_process_holding_the_lock_is_waited_for_or_reported(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    with held_elsewhere(lock) as holder:
        with exclusive_lock(lock, wait=False) as held:
            assert not held  # `engines build` refuses to run beside another
        waited = threading.Event()

        def release() -> None:  # once this process says it waits, the holder lets go
            waited.set()
            holder.release()

        with exclusive_lock(lock, on_wait=release) as held:
            assert held and waited.is_set()


def test_a_holder_that_was_killed_leaves_the_lock_free(tmp_path: Path) -> None:
    lock = tmp_path / "build.lock"
    with held_elsewhere(lock):
        pass  # killed as the block ends
    with exclusive_lock(lock, wait=False) as held:
        assert held
