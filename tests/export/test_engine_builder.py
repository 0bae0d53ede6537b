"""`engines build` without TensorRT: a clear error, and the bundle left as it was."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.runtime.engines.tensorrt.build import tensorrt_version

pytestmark = pytest.mark.skipif(
    tensorrt_version() is not None,
    reason="TensorRT is installed: the engine build itself is tested in tests/runtime/test_tensorrt_backend.py",
)


def test_engines_build_without_tensorrt_fails_cleanly(
    tiny_bundles: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundles("libero")
    manifest = (bundle / "manifest.json").read_text()
    assert main(["engines", "build", str(bundle)]) == 2
    error = capsys.readouterr().err
    assert "tensorrt" in error.lower() and "not installed" in error
    assert (bundle / "manifest.json").read_text() == manifest
    assert not (bundle / "engines").exists()
