"""Engine cache keys, records and target checks: pure Python, so they run on every machine."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.tensorrt.build import set_timing_cache
from cosmos_edge.runtime.engines.tensorrt.cache import (
    REBUILD_BUNDLE_HINT,
    BuildOptions,
    EngineCache,
    EngineRecord,
    EngineTarget,
    OnnxSource,
    cache_rebuild_hint,
    check_engine_source,
    check_engine_target,
    engine_cache_key,
    read_engine,
    record_path,
    write_engine,
)
from cosmos_edge.runtime.errors import EngineError
from tests.helpers.observations import TinyBundles

H100 = EngineTarget("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")
ENGINE_BYTES = b"serialized engine bytes"


def _record(target: EngineTarget = H100, data: bytes = ENGINE_BYTES, file: str = "dit_b1.engine") -> EngineRecord:
    return EngineRecord(
        graph="dit_b1",
        file=file,
        sha256=hashlib.sha256(data).hexdigest(),
        onnx_sha256="ab" * 32,
        target=target,
        options=BuildOptions(),
        build_seconds=12.5,
        fused_attention_layers=("_gemm_mha_v2_myl0_17", "_gemm_mha_v2_myl0_31"),
    )


def test_cache_key_is_stable_and_changes_with_every_input() -> None:
    key = engine_cache_key("ab" * 32, H100, BuildOptions())
    assert key == engine_cache_key("ab" * 32, EngineTarget(*dataclasses.astuple(H100)), BuildOptions())
    variants = [
        engine_cache_key("cd" * 32, H100, BuildOptions()),
        engine_cache_key("ab" * 32, dataclasses.replace(H100, tensorrt_version="10.14.1.48"), BuildOptions()),
        engine_cache_key("ab" * 32, dataclasses.replace(H100, gpu="NVIDIA H100 PCIe"), BuildOptions()),
        engine_cache_key("ab" * 32, dataclasses.replace(H100, compute_capability="8.9"), BuildOptions()),
        engine_cache_key("ab" * 32, H100, BuildOptions(optimization_level=5)),
        engine_cache_key("ab" * 32, H100, BuildOptions(workspace_bytes=1 << 30)),
    ]
    assert len({key, *variants}) == 1 + len(variants)


def test_onnx_digest_covers_external_data(tmp_path: Path) -> None:
    graph, data = tmp_path / "dit_b1.onnx", tmp_path / "dit_b1.onnx.data"
    graph.write_bytes(b"graph")
    data.write_bytes(b"weights v1")
    first = OnnxSource(graph, (data,)).sha256()
    data.write_bytes(b"weights v2")
    assert OnnxSource(graph, (data,)).sha256() != first
    assert OnnxSource(graph).sha256() != first


def test_a_bundles_graph_digest_from_its_manifest_is_the_digest_of_its_files(tiny_bundles: TinyBundles) -> None:
    # Backends take it from the manifest's verified hashes instead of reading the graph's GBs again.
    graph = Bundle.open(tiny_bundles("aloha")).graph_file("dit_b1", with_engine=False)
    assert graph.onnx_sha256 == OnnxSource(graph.onnx, graph.external_data).sha256()
    assert OnnxSource(graph.onnx, known_sha256="cd" * 32).sha256() == "cd" * 32


def test_an_engine_built_from_other_onnx_files_is_refused(tmp_path: Path) -> None:
    engine = tmp_path / "dit_b1.engine"
    check_engine_source(_record(), "dit_b1", "ab" * 32, engine)  # the record's digest
    check_engine_source(_record(), "dit_b1", None, engine)  # nothing to match against
    with pytest.raises(EngineError, match=r"built from other ONNX files of graph 'dit_b1' \(another export\)"):
        check_engine_source(_record(), "dit_b1", "cd" * 32, engine)
    with pytest.raises(EngineError, match="expected graph 'dit_b2', got an engine of 'dit_b1'"):
        check_engine_source(_record(), "dit_b2", None, engine)


def test_onnx_digest_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"dit_b1\.onnx: expected a readable file"):
        OnnxSource(tmp_path / "dit_b1.onnx").sha256()


def test_build_options_are_validated() -> None:
    with pytest.raises(EngineError, match=r"BuildOptions.optimization_level: expected 0..5, got 6"):
        BuildOptions(optimization_level=6)
    with pytest.raises(EngineError, match=r"BuildOptions.workspace_bytes: expected a positive int or None, got 0"):
        BuildOptions(workspace_bytes=0)


def test_record_round_trips_through_json_and_manifest_entry() -> None:
    record = _record()
    entry = json.loads(json.dumps(record.manifest_entry()))
    assert entry["fused_attention_count"] == 2
    assert entry["target"] == {
        "tensorrt_version": "10.13.0.35",
        "gpu": "NVIDIA H100 80GB HBM3",
        "compute_capability": "9.0",
    }
    assert EngineRecord.from_dict(entry, "manifest.json") == record


def test_record_from_a_newer_schema_is_refused() -> None:
    entry = {**dataclasses.asdict(_record()), "schema": 99}
    with pytest.raises(EngineError, match=r"manifest.json: expected schema <= 1, got 99 .*newer cosmos-edge"):
        EngineRecord.from_dict(entry, "manifest.json")


def test_record_missing_a_field_names_the_file_and_field() -> None:
    entry = dataclasses.asdict(_record())
    del entry["sha256"]
    with pytest.raises(EngineError, match=r"engine record x\.json: expected field 'sha256', got none"):
        EngineRecord.from_dict(entry, "x.json")


def test_same_target_is_accepted() -> None:
    check_engine_target(_record(), EngineTarget(*dataclasses.astuple(H100)), Path("e.engine"), REBUILD_BUNDLE_HINT)


@pytest.mark.parametrize(
    ("here", "named"),
    [
        (dataclasses.replace(H100, tensorrt_version="10.14.1.48"), "TensorRT version: engine built for '10.13.0.35'"),
        (EngineTarget("10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0"), "GPU: engine built for 'NVIDIA H100 80GB HBM3'"),
    ],
)
def test_other_target_is_refused_with_what_to_rebuild(here: EngineTarget, named: str) -> None:
    with pytest.raises(EngineError) as raised:
        check_engine_target(_record(), here, Path("bundle/dit_b1.engine"), REBUILD_BUNDLE_HINT)
    message = str(raised.value)
    assert "engine bundle/dit_b1.engine (graph 'dit_b1') was built for TensorRT 10.13.0.35 on NVIDIA H100" in message
    assert named in message
    assert "cosmos-edge engines build" in message


def test_read_engine_checks_target_then_bytes(tmp_path: Path) -> None:
    engine = tmp_path / "dit_b1.engine"
    write_engine(engine, _record(), ENGINE_BYTES)
    assert read_engine(engine, H100, REBUILD_BUNDLE_HINT) == (_record(), ENGINE_BYTES)

    a100 = EngineTarget("10.13.0.35", "NVIDIA A100-SXM4-80GB", "8.0")
    with pytest.raises(EngineError, match=r"this machine has TensorRT 10\.13\.0\.35 on NVIDIA A100"):
        read_engine(engine, a100, cache_rebuild_hint(engine))

    engine.write_bytes(ENGINE_BYTES[:-3])
    with pytest.raises(
        EngineError, match=r"expected sha256 .* \(from dit_b1\.json\), got .* truncated or was replaced"
    ):
        read_engine(engine, H100, cache_rebuild_hint(engine))


def test_engine_without_record_is_refused(tmp_path: Path) -> None:
    engine = tmp_path / "dit_b1.engine"
    engine.write_bytes(ENGINE_BYTES)
    with pytest.raises(EngineError, match=r"engine record .*dit_b1\.json: expected a JSON EngineRecord"):
        read_engine(engine, H100, REBUILD_BUNDLE_HINT)


@pytest.mark.parametrize(
    ("record", "named"), [(b"[1]", "expected a JSON object, got list"), (b"\xff\xfe", "expected a JSON EngineRecord")]
)
def test_an_engine_record_that_is_not_a_json_object_is_refused(tmp_path: Path, record: bytes, named: str) -> None:
    engine = tmp_path / "dit_b1.engine"
    engine.write_bytes(ENGINE_BYTES)
    record_path(engine).write_bytes(record)
    with pytest.raises(EngineError, match=rf"engine record .*dit_b1\.json: {named}"):
        read_engine(engine, H100, REBUILD_BUNDLE_HINT)


def test_cache_lookup_misses_then_hits(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    key = engine_cache_key("ab" * 32, H100, BuildOptions())
    assert cache.lookup("dit_b1", key, H100) is None
    path = cache.engine_path("dit_b1", key)
    assert path.name == f"dit_b1-{key[:16]}.engine"
    write_engine(path, _record(file=path.name), ENGINE_BYTES)
    assert cache.lookup("dit_b1", key, H100) == (_record(file=path.name), ENGINE_BYTES)
    assert not list(path.parent.glob(".*partial"))


def test_cache_entry_with_forged_target_is_refused_with_the_files_to_delete(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    key = engine_cache_key("ab" * 32, H100, BuildOptions())
    path = cache.engine_path("dit_b1", key)
    fake = EngineTarget("9.9.9", "NVIDIA GeForce RTX 5090", "12.0")
    write_engine(path, _record(target=fake, file=path.name), ENGINE_BYTES)
    with pytest.raises(EngineError) as raised:
        cache.lookup("dit_b1", key, H100)
    assert f"delete {path} and {record_path(path)}, and the next run rebuilds it" in str(raised.value)


def test_engine_left_without_record_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    cache.engine_path("dit_b1", "0" * 64).write_bytes(ENGINE_BYTES)
    assert cache.lookup("dit_b1", "0" * 64, H100) is None
    assert "has no record beside it" in caplog.text


def test_a_record_left_without_its_engine_is_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = EngineCache(tmp_path)
    key = engine_cache_key("ab" * 32, H100, BuildOptions())
    path = cache.engine_path("dit_b1", key)
    write_engine(path, _record(file=path.name), ENGINE_BYTES)
    path.unlink()  # the engine removed by hand, its record left
    assert cache.lookup("dit_b1", key, H100) is None
    assert "is gone, its record left (removed by hand?): rebuilding it" in caplog.text


def test_an_engine_that_is_not_the_one_its_record_describes_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two processes building one engine at once: one's engine can end up beside the other's record.
    cache = EngineCache(tmp_path)
    key = engine_cache_key("ab" * 32, H100, BuildOptions())
    path = cache.engine_path("dit_b1", key)
    write_engine(path, _record(file=path.name), ENGINE_BYTES)
    path.write_bytes(ENGINE_BYTES + b"another build")
    assert cache.lookup("dit_b1", key, H100) is None
    assert "is not the one its record describes (built by two processes at once?): rebuilding it" in caplog.text
    with pytest.raises(EngineError, match="the file is truncated or was replaced"):  # a bundle's own engine: refused
        read_engine(path, H100, REBUILD_BUNDLE_HINT)


def test_timing_cache_is_per_tensorrt_version_and_gpu(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path)
    path = cache.timing_cache_path(H100)
    assert path.name == "timing-trt10.13.0.35-NVIDIA-H100-80GB-HBM3.cache"
    assert cache.timing_cache_path(dataclasses.replace(H100, tensorrt_version="10.14.1.48")) != path


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data


class FakeBuilderConfig:
    """What a TensorRT builder config does with timing caches: it refuses one made on another device (set returns
    False) and cannot read a damaged one (create returns None)."""

    def __init__(self) -> None:
        self.set: FakeTimingCache | None = None

    def create_timing_cache(self, data: bytes) -> FakeTimingCache | None:
        return None if data == b"damaged" else FakeTimingCache(data)

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        accepted = cache.data != b"another device's" or ignore_mismatch
        self.set = cache if accepted else self.set
        return accepted


@pytest.mark.parametrize(("saved", "kept"), [(None, b""), (b"this device's", b"this device's")])
def test_a_timing_cache_that_fits_is_used(tmp_path: Path, saved: bytes | None, kept: bytes) -> None:
    path = tmp_path / "timing.cache"
    if saved is not None:
        path.write_bytes(saved)
    config = FakeBuilderConfig()
    cache = set_timing_cache(config, path)  # type: ignore[arg-type]
    assert cache is config.set and cache.data == kept  # type: ignore[attr-defined]


@pytest.mark.parametrize("saved", [b"another device's", b"damaged"])
def test_a_timing_cache_refused_is_replaced_by_a_new_one(
    tmp_path: Path, saved: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "timing.cache"
    path.write_bytes(saved)
    config = FakeBuilderConfig()
    cache = set_timing_cache(config, path)  # type: ignore[arg-type]
    assert cache is config.set and cache.data == b""  # type: ignore[attr-defined]
    assert f"TensorRT timing cache {path}: not usable on this device" in caplog.text
