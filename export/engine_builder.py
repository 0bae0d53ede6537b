"""Builds the TensorRT engines of a bundle on the target machine and records them in its manifest.

Engines are bound to one TensorRT version and GPU model, so they are built where they run: `cosmos-edge engines
build BUNDLE` after copying an exported bundle to the robot workstation. Without prebuilt engines the TensorRT
backend builds each one on first use into the bundle's cache; building ahead moves those minutes out of start-up.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from cosmos_edge.runtime.bundle.manifest import ENGINES_DIR, Bundle, file_record, write_manifest
from cosmos_edge.runtime.engines.tensorrt.build import build_engine, require_tensorrt
from cosmos_edge.runtime.engines.tensorrt.cache import OnnxSource, record_path

_LOG = logging.getLogger(__name__)


def build_bundle_engines(bundle_dir: str | Path, device: int = 0, graphs: tuple[str, ...] = ()) -> Bundle:
    """Builds an engine per graph (all by default) into `BUNDLE/engines/` and lists it in the manifest.

    The manifest is rewritten once, after every engine is built, so an interrupted build leaves it unchanged.
    """
    require_tensorrt()
    bundle = Bundle.open(bundle_dir)
    names = graphs or tuple(bundle.manifest.graphs)
    engines = dict(bundle.manifest.engines)
    files = dict(bundle.manifest.files)
    (bundle.root / ENGINES_DIR).mkdir(exist_ok=True)
    for index, name in enumerate(names, start=1):
        graph = bundle.graph(name)
        onnx_files = [bundle.file(relative) for relative in graph.files]
        engine_path = bundle.root / ENGINES_DIR / f"{name}.engine"
        _LOG.info("engine %d/%d: %s", index, len(names), name)
        record, _ = build_engine(
            graph.spec, OnnxSource(onnx_files[0], tuple(onnx_files[1:])), engine_path, device=device
        )
        engines[name] = record.manifest_entry()
        for path in (engine_path, record_path(engine_path)):
            files[path.relative_to(bundle.root).as_posix()] = file_record(path)
    write_manifest(bundle.root, dataclasses.replace(bundle.manifest, engines=engines, files=files))
    return Bundle.open(bundle.root)
