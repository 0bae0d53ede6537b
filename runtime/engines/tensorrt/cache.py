"""TensorRT engine files and what they were built from and for: cache key, sidecar record, target check.

A serialized engine runs only on the TensorRT version and the GPU model it was built with, so each engine file
`NAME.engine` has a record `NAME.json` beside it saying what it was built from (the ONNX digest, build options) and
for (TensorRT version, GPU name, compute capability). An engine whose record names another target is refused with
a message saying how to rebuild it, before TensorRT is asked to deserialize it. The record doubles as the engine's
entry in a bundle manifest. Pure Python: everything here is tested on machines without TensorRT or a GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import graph_files_digest, sha256_file, write_atomic

_LOG = logging.getLogger(__name__)

ENGINE_RECORD_SCHEMA = 1
REBUILD_BUNDLE_HINT = (
    "rebuild the bundle's engines on this machine with `cosmos-edge engines build BUNDLE`, or serve the bundle's ONNX "
    "graphs with --backend onnxruntime"
)


@dataclass(frozen=True)
class EngineTarget:
    """What an engine is bound to: TensorRT version, GPU model and its compute capability ("9.0" for H100)."""

    tensorrt_version: str
    gpu: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu} (compute capability {self.compute_capability})"

    def mismatches(self, current: EngineTarget) -> list[str]:
        """One line per field where `current` differs from this (the engine's) target."""
        return [
            f"{field}: engine built for {built!r}, this machine has {here!r}"
            for field, built, here in (
                ("TensorRT version", self.tensorrt_version, current.tensorrt_version),
                ("GPU", self.gpu, current.gpu),
                ("compute capability", self.compute_capability, current.compute_capability),
            )
            if built != here
        ]


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings that change the engine, hence part of the cache key.

    Args:
        optimization_level: TensorRT builder optimization level 0-5 (3 is TensorRT's default).
        workspace_bytes: workspace memory pool limit; None leaves TensorRT's default (the device's memory).
    """

    optimization_level: int = 3
    workspace_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.optimization_level not in range(6):
            raise EngineError(f"BuildOptions.optimization_level: expected 0..5, got {self.optimization_level!r}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise EngineError(
                f"BuildOptions.workspace_bytes: expected a positive int or None, got {self.workspace_bytes}"
            )


DEFAULT_BUILD_OPTIONS = BuildOptions()


@dataclass(frozen=True)
class OnnxSource:
    """An ONNX graph and its external-data files (graphs over 2 GB), which all feed the engine's weights."""

    path: Path
    external_data: tuple[Path, ...] = ()
    known_sha256: str | None = None  # `sha256()` of files a manifest verified already: not read again (GBs)

    def sha256(self) -> str:
        """Digest of every file's name and bytes, so new weights in an external-data file give a new engine."""
        if self.known_sha256 is not None:
            return self.known_sha256
        hashes = []
        for path in (self.path, *self.external_data):
            try:
                hashes.append((path.name, sha256_file(path)))
            except OSError as error:
                raise EngineError(f"ONNX graph file {path}: expected a readable file, got {error}") from error
        return graph_files_digest(hashes)


def engine_cache_key(onnx_sha256: str, target: EngineTarget, options: BuildOptions) -> str:
    """sha256 of everything an engine depends on; precision is in the ONNX types (strongly typed build)."""
    payload = {
        "schema": ENGINE_RECORD_SCHEMA,
        "onnx": onnx_sha256,
        "target": asdict(target),
        "options": asdict(options),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class EngineRecord:
    """The sidecar of one engine file, and its entry in a bundle manifest's `engines` section.

    `file` is the engine's file name (beside the record); `fused_attention_layers` are the engine inspector's
    layers that run a fused multi-head attention kernel (see `build.fused_attention_layers`).
    """

    graph: str
    file: str
    sha256: str
    onnx_sha256: str
    target: EngineTarget
    options: BuildOptions
    build_seconds: float
    fused_attention_layers: tuple[str, ...]
    schema: int = ENGINE_RECORD_SCHEMA

    def manifest_entry(self) -> dict[str, Any]:
        return {**asdict(self), "fused_attention_count": len(self.fused_attention_layers)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> EngineRecord:
        """Parses a record read from `source` (a file name, for the error message)."""
        schema = data.get("schema")
        if not isinstance(schema, int) or schema > ENGINE_RECORD_SCHEMA:
            raise EngineError(
                f"engine record {source}: expected schema <= {ENGINE_RECORD_SCHEMA}, got {schema!r} "
                "(written by a newer cosmos-edge: upgrade it, or rebuild the engine)"
            )
        try:
            return cls(
                graph=str(data["graph"]),
                file=str(data["file"]),
                sha256=str(data["sha256"]),
                onnx_sha256=str(data["onnx_sha256"]),
                target=EngineTarget(**data["target"]),
                options=BuildOptions(**data["options"]),
                build_seconds=float(data["build_seconds"]),
                fused_attention_layers=tuple(str(name) for name in data["fused_attention_layers"]),
                schema=schema,
            )
        except KeyError as error:
            raise EngineError(f"engine record {source}: expected field {error}, got none") from error
        except (TypeError, ValueError, EngineError) as error:
            raise EngineError(f"engine record {source}: expected the fields of EngineRecord, got {error}") from error


def record_path(engine_path: Path) -> Path:
    return engine_path.with_suffix(".json")


def check_engine_target(record: EngineRecord, current: EngineTarget, engine_path: Path, rebuild_hint: str) -> None:
    """Refuses an engine built for another TensorRT version or GPU, saying what to rebuild and how."""
    problems = record.target.mismatches(current)
    if problems:
        raise EngineError(
            f"engine {engine_path} (graph {record.graph!r}) was built for {record.target.describe()}, "
            f"but this machine has {current.describe()} ({'; '.join(problems)}). A TensorRT engine runs only on the "
            f"TensorRT version and GPU model it was built with: {rebuild_hint}"
        )


def cache_rebuild_hint(engine_path: Path) -> str:
    return f"delete {engine_path} and {record_path(engine_path)}, and the next run rebuilds it"


def read_engine(engine_path: Path, current: EngineTarget, rebuild_hint: str) -> tuple[EngineRecord, bytes]:
    """Reads an engine and its record, refusing another target or bytes that do not match the record's sha256."""
    record = read_engine_record(engine_path, current, rebuild_hint)
    data = _engine_bytes(engine_path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256:
        raise EngineError(
            f"engine {engine_path}: expected sha256 {record.sha256} (from {record_path(engine_path).name}), got "
            f"{digest}; the file is truncated or was replaced: {rebuild_hint}"
        )
    return record, data


def read_engine_record(engine_path: Path, current: EngineTarget, rebuild_hint: str) -> EngineRecord:
    """The record beside an engine, refused when it names another target."""
    sidecar = record_path(engine_path)
    try:
        raw = json.loads(sidecar.read_text())
    except (OSError, ValueError) as error:  # ValueError: bad JSON or bad UTF-8
        raise EngineError(f"engine record {sidecar}: expected a JSON EngineRecord, got {error}") from error
    if not isinstance(raw, dict):
        raise EngineError(f"engine record {sidecar}: expected a JSON object, got {type(raw).__name__}")
    record = EngineRecord.from_dict(raw, str(sidecar))
    check_engine_target(record, current, engine_path, rebuild_hint)
    return record


def _engine_bytes(engine_path: Path) -> bytes:
    try:
        return engine_path.read_bytes()
    except OSError as error:
        raise EngineError(f"engine {engine_path}: expected a readable file, got {error}") from error


def check_engine_source(record: EngineRecord, graph: str, onnx_sha256: str | None, engine_path: Path) -> None:
    """An engine was built from `graph`, and (given `onnx_sha256`) from exactly these ONNX files."""
    if record.graph != graph:
        raise EngineError(f"engine {engine_path}: expected graph {graph!r}, got an engine of {record.graph!r}")
    if onnx_sha256 is not None and record.onnx_sha256 != onnx_sha256:
        raise EngineError(
            f"engine {engine_path}: built from other ONNX files of graph {graph!r} (another export); "
            f"{REBUILD_BUNDLE_HINT}"
        )


def write_engine(engine_path: Path, record: EngineRecord, data: bytes) -> None:
    """Writes the engine, then its record: a record is present only beside a complete engine."""
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(engine_path, data)
    write_atomic(record_path(engine_path), json.dumps(asdict(record), indent=2).encode())


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


class EngineCache:
    """A folder of engines named `<graph>-<key[:16]>.engine` (+ `.json` record), and one timing cache per target.

    Timing caches are kept per TensorRT version and GPU: reusing one across GPUs can slow the engines built with it
    (TensorRT demo/Diffusion README).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def engine_path(self, graph: str, key: str) -> Path:
        return self.root / f"{graph}-{key[:16]}.engine"

    def timing_cache_path(self, target: EngineTarget) -> Path:
        return self.root / f"timing-trt{_slug(target.tensorrt_version)}-{_slug(target.gpu)}.cache"

    def lookup(self, graph: str, key: str, current: EngineTarget) -> tuple[EngineRecord, bytes] | None:
        """The cached engine for `key`, or None if there is none, or one to build again: without its record (an
        interrupted write) or not the engine its record describes (two processes built it at once, each writing its
        engine and its record). A record naming another target is refused."""
        engine_path = self.engine_path(graph, key)
        if not record_path(engine_path).exists():
            if engine_path.exists():
                _LOG.warning("engine %s has no record beside it (interrupted write?): rebuilding it", engine_path)
            return None
        if not engine_path.exists():
            _LOG.warning("engine %s is gone, its record left (removed by hand?): rebuilding it", engine_path)
            return None
        record = read_engine_record(engine_path, current, cache_rebuild_hint(engine_path))
        data = _engine_bytes(engine_path)
        if hashlib.sha256(data).hexdigest() != record.sha256:
            _LOG.warning(
                "engine %s is not the one its record describes (built by two processes at once?): rebuilding it",
                engine_path,
            )
            return None
        return record, data
