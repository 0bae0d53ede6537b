"""Writes that fail part way (a full disk, a file-size limit) leave nothing behind: a truncated output would be
refused as existing by the next run, which never replaces files."""

from __future__ import annotations

import contextlib
import resource
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.cli.npz_files import write_npz
from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import CheckpointFiles


@contextlib.contextmanager
def file_size_limit(limit_bytes: int) -> Iterator[None]:
    """Writes past `limit_bytes` fail with EFBIG (Python ignores SIGXFSZ), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_an_npz_that_cannot_be_written_whole_is_not_written_at_all(tmp_path: Path) -> None:
    out = tmp_path / "result.npz"
    with file_size_limit(20_000), pytest.raises(EngineError, match=rf"{out}: cannot be written \(File too large\)"):
        write_npz(out, {"actions": np.zeros((100, 100), np.float32)})
    assert list(tmp_path.iterdir()) == []
    write_npz(out, {"actions": np.zeros((100, 100), np.float32)})  # the rerun writes it
    assert np.load(out)["actions"].shape == (100, 100)


def test_text_embeddings_that_cannot_be_written_whole_are_not_written_at_all(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.safetensors"
    merge = ["text-embeddings", "merge", str(tiny_assets["aloha"].text_embeddings), "--out", str(out)]
    with file_size_limit(20_000):
        assert main(merge) == 1
    assert f"--out {out}: cannot be written (File too large)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert main(merge) == 0
