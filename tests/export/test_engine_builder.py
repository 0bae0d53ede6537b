"""`engines build` without TensorRT: a clear error, and the bundle left as it was; an interrupted build (with a
stand-in for the TensorRT builder) leaves a bundle that opens."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.export import engine_builder
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.graph import GraphSpec
from cosmos_edge.runtime.engines.tensorrt.build import tensorrt_version
from cosmos_edge.runtime.engines.tensorrt.cache import record_path
from cosmos_edge.runtime.errors import BundleError, EngineError
from tests.helpers.locks import held_elsewhere

pytestmark = pytest.mark.skipif(
    tensorrt_version() is not None,
    reason="TensorRT is installed: the engine build itself is tested in tests/runtime/test_tensorrt_backend.py",
)


def test_engines_build_without_tensorrt_fails_cleanly(
    tiny_bundles: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundles("libero")
    manifest = (bundle / "manifest.json").read_text()
    assert main(["engines", "build", str(bundle)]) == 1  # the environment lacks it: not a usage error
    error = capsys.readouterr().err
    assert "tensorrt" in error.lower() and "not installed" in error
    assert (bundle / "manifest.json").read_text() == manifest
    assert not (bundle / "engines").exists()


def test_every_graph_asked_for_is_checked_before_any_build(
    tiny_bundles: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundles("libero")
    assert main(["engines", "build", str(bundle), "--graph", "dit_b1", "--graph", "dit_b4"]) == 2
    graphs = ["dit_b1", "dit_b2", "dit_text_kv", "vae_encoder_cameras"]
    assert f"has no graph 'dit_b4'; it has {graphs}" in capsys.readouterr().err
    assert not (bundle / "engines").exists()


def test_a_bundle_that_cannot_take_engines_is_named_before_any_build(
    tiny_bundles: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = Path(shutil.copytree(tiny_bundles("libero"), tmp_path / "bundle"))
    (bundle / "engines").write_text("a file where the engines' folder goes")
    monkeypatch.setattr(engine_builder, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engine_builder, "build_engine", lambda *args, **kwargs: pytest.fail("built"))
    assert main(["engines", "build", str(bundle)]) == 1
    assert f"{bundle / 'engines'}: cannot make the folder for the bundle's TensorRT engines" in capsys.readouterr().err


class _Record:
    """The part of an engine record the bundle builder reads: its file, and the sha256 of the engine's bytes."""

    def __init__(self, file: str, data: bytes) -> None:
        self.file = file
        self.sha256 = hashlib.sha256(data).hexdigest()

    def manifest_entry(self) -> dict[str, object]:
        return {"file": self.file}


def test_an_interrupted_rebuild_leaves_a_bundle_that_opens(
    tiny_bundles: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = Path(shutil.copytree(tiny_bundles("libero"), tmp_path / "bundle"))
    interrupt_on: list[str] = []

    def build_engine(spec: GraphSpec, onnx: object, engine_path: Path, device: int = 0) -> tuple[_Record, bytes]:
        engine_path.write_bytes(b"half an engine")  # overwritten in place, as a real build does
        if spec.name in interrupt_on:
            raise KeyboardInterrupt
        data = f"engine of {spec.name}".encode()
        engine_path.write_bytes(data)
        record_path(engine_path).write_text("{}")
        return _Record(engine_path.name, data), data

    monkeypatch.setattr(engine_builder, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engine_builder, "build_engine", build_engine)
    names = sorted(Bundle.open(bundle).manifest.graphs)
    assert sorted(engine_builder.build_bundle_engines(bundle).manifest.engines) == names

    interrupt_on.append(names[1])
    with pytest.raises(KeyboardInterrupt):
        engine_builder.build_bundle_engines(bundle)
    reopened = Bundle.open(bundle)  # every file it lists is whole
    assert sorted(reopened.manifest.engines) == [name for name in names if name != names[1]]
    assert reopened.file(f"engines/{names[0]}.engine").read_bytes() == f"engine of {names[0]}".encode()


def test_an_engine_record_edited_in_place_is_refused_with_the_engine(
    tiny_bundles: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = Path(shutil.copytree(tiny_bundles("libero"), tmp_path / "bundle"))

    def build_engine(spec: GraphSpec, onnx: object, engine_path: Path, device: int = 0) -> tuple[_Record, bytes]:
        data = f"engine of {spec.name}".encode()
        engine_path.write_bytes(data)
        record_path(engine_path).write_text('{"gpu": "NVIDIA H100"}')
        return _Record(engine_path.name, data), data

    monkeypatch.setattr(engine_builder, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engine_builder, "build_engine", build_engine)
    name = engine_builder.build_bundle_engines(bundle).graph_names("dit")[0]
    Bundle.open(bundle).graph_file(name, with_engine=True)  # as built
    # The record decides which GPU the engine may run on: another GPU's name, of the same length, is caught.
    record_path(bundle / "engines" / f"{name}.engine").write_text('{"gpu": "NVIDIA H200"}')
    with pytest.raises(BundleError, match=rf"engines/{name}\.json: sha256 mismatch"):
        Bundle.open(bundle).graph_file(name, with_engine=True)


def test_a_second_engines_build_on_a_bundle_is_refused_while_one_runs(
    tiny_bundles: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rewrites the manifest from its own copy: run together, the later would drop the earlier's engines."""
    bundle = Path(shutil.copytree(tiny_bundles("libero"), tmp_path / "bundle"))
    monkeypatch.setattr(engine_builder, "require_tensorrt", lambda: None)
    monkeypatch.setattr(engine_builder, "build_engine", lambda *args, **kwargs: pytest.fail("built beside another"))
    (bundle / "cache").mkdir(exist_ok=True)
    refused = pytest.raises(EngineError, match=r"another `cosmos-edge engines build` is building its engines")
    with held_elsewhere(bundle / "cache" / engine_builder.BUILD_LOCK_NAME), refused:
        engine_builder.build_bundle_engines(bundle)
    assert Bundle.open(bundle).manifest.engines == {}
