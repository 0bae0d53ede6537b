"""Builds the TensorRT engines of a bundle on the target machine and records them in its manifest.

Engines are bound to one TensorRT version and GPU model, so they are built where they run: `cosmos-edge engines
build BUNDLE` after copying an exported bundle to the robot workstation. Without prebuilt engines the TensorRT
backend builds each one on first use into the bundle's cache; building ahead moves those minutes out of start-up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cosmos_edge.runtime.bundle.manifest import CACHE_DIR, ENGINES_DIR, Bundle, FileRecord, file_record, write_manifest
from cosmos_edge.runtime.engines.tensorrt.build import build_engine, require_tensorrt
from cosmos_edge.runtime.engines.tensorrt.cache import OnnxSource, record_path
from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import exclusive_lock, writable_folder

_LOG = logging.getLogger(__name__)
BUILD_LOCK_NAME = "engines-build.lock"  # in the bundle's machine-local cache: held by its `engines build`


def build_bundle_engines(bundle_dir: str | Path, device: int = 0, graphs: tuple[str, ...] = ()) -> Bundle:
    """Builds an engine per graph (all by default) into `BUNDLE/engines/` and lists it in the manifest.

    An engine being built is not listed: the manifest drops a graph's old engine before its files are overwritten
    and lists the new one once it is complete, so an interrupted or failed build leaves a bundle that opens (the
    graphs not yet built are built on first use, as without prebuilt engines).
    """
    bundle = Bundle.open(bundle_dir)  # a wrong path is named first, on a machine without TensorRT too
    names = tuple(dict.fromkeys(graphs)) or tuple(bundle.manifest.graphs)
    for name in names:  # every --graph named before the first build (minutes each), not when its turn comes
        bundle.graph(name)
    require_tensorrt()
    writable_folder(bundle.root, "its rewritten manifest")  # before minutes of building, not after
    writable_folder(bundle.root / ENGINES_DIR, "the bundle's TensorRT engines")
    writable_folder(bundle.root / CACHE_DIR, "the bundle's cache (its build lock)")
    with exclusive_lock(bundle.root / CACHE_DIR / BUILD_LOCK_NAME, wait=False) as alone:
        if not alone:  # each rewrites the manifest from its own copy: the later would drop the earlier's engines
            raise EngineError(
                f"bundle {bundle.root}: another `cosmos-edge engines build` is building its engines; run one at a time"
            )
        return _build(Bundle.open(bundle.root), names, device)  # the manifest as it is now that none other builds


def _build(bundle: Bundle, names: tuple[str, ...], device: int) -> Bundle:
    engines = dict(bundle.manifest.engines)
    files = dict(bundle.manifest.files)

    def record_in_manifest() -> None:
        write_manifest(bundle.root, dataclasses.replace(bundle.manifest, engines=engines, files=files))

    for index, name in enumerate(names, start=1):
        graph = bundle.graph_file(name, with_engine=False)  # its files verified, and their digest known
        engine_path = bundle.root / ENGINES_DIR / f"{name}.engine"
        written = [path.relative_to(bundle.root).as_posix() for path in (engine_path, record_path(engine_path))]
        if engines.pop(name, None) is not None:
            for relative in written:
                files.pop(relative, None)
            record_in_manifest()
        _LOG.info("engine %d/%d: %s", index, len(names), name)
        source = OnnxSource(graph.onnx, graph.external_data, known_sha256=graph.onnx_sha256)
        record, data = build_engine(graph.spec, source, engine_path, device=device)
        engines[name] = record.manifest_entry()
        engine_file, record_file = written
        # The engine's digest is its record's (of the bytes just written: GBs not read again); the record is hashed.
        files[engine_file] = FileRecord(sha256=record.sha256, size=len(data))
        files[record_file] = file_record(bundle.root / record_file)
        record_in_manifest()
    return Bundle.open(bundle.root)
