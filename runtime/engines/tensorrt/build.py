"""Building TensorRT engines from a bundle's ONNX graphs, and the TensorRT pieces the `tensorrt` backend loads with.

The network is strongly typed, so precision comes from the ONNX tensor types (BF16 by default, with the FP32 islands
the exporter kept; TensorRT 11 has no other mode). Profiling verbosity is DETAILED so that the engine inspector can
list which layers run fused attention. A timing cache per TensorRT version and GPU speeds up rebuilds, and progress
is logged, since the 2B DiT takes minutes. Engines are cached and checked against their target in `tensorrt/cache.py`.

TensorRT is imported inside the functions that use it, after `require_tensorrt()`, so that this module imports,
and the other backends run, on machines without it (its wheels need an NVIDIA driver to run).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from cosmos_edge.runtime.engines.graph import GraphSpec, check_signature
from cosmos_edge.runtime.engines.tensorrt.cache import (
    DEFAULT_BUILD_OPTIONS,
    BuildOptions,
    EngineCache,
    EngineRecord,
    EngineTarget,
    OnnxSource,
    cache_rebuild_hint,
    write_engine,
)
from cosmos_edge.runtime.engines.tensorrt.cuda_buffers import check_cuda, import_cudart
from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import writable_folder, write_atomic

if TYPE_CHECKING:
    import tensorrt as trt

_LOG = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "backend 'tensorrt' is not installed: install TensorRT >= 10 and cuda-python on a machine with an NVIDIA GPU "
    "(pip install 'cosmos-edge[tensorrt,gpu]'), or serve the bundle's ONNX graphs with `act`/`serve --backend "
    "onnxruntime`"
)
_PROGRESS_INTERVAL_S = 30.0
# Fused attention as TensorRT 10 names it in the engine inspector: Myelin's `_gemm_mha_v2_myl0_17` layers (tactic
# `_gemm_mha_v2_0x...`), `_gemv_mha_v1` for one query, `fmha`/flash kernels; an IAttention layer (TensorRT >= 10.14)
# has an attention layer type. Layer names also carry ONNX node names, so "attention" alone is no evidence.
_FUSED_ATTENTION_NAME = re.compile(r"_(?:gemm|gemv)_mha|fused_?mha|fmha|mha_v\d|flash_?att", re.IGNORECASE)
_ATTENTION_LAYER_TYPES = frozenset({"attention", "kattention", "mha"})


def tensorrt_version() -> str | None:
    """Version of the importable TensorRT, or None. `tensorrt-stubs` alone installs a `tensorrt` namespace package
    without the library: that counts as absent."""
    try:
        module = importlib.import_module("tensorrt")
    except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer cannot be loaded
        return None
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) and hasattr(module, "Builder") else None


def require_tensorrt() -> str:
    """The TensorRT version, or EngineError saying how to install it (or which backend to use instead)."""
    version = tensorrt_version()
    if version is None:
        raise EngineError(TENSORRT_MISSING)
    if int(version.split(".")[0]) < 10:
        raise EngineError(
            f"backend 'tensorrt': expected TensorRT >= 10, got {version}: upgrade it (pip install --upgrade "
            "'cosmos-edge[tensorrt]' on a CUDA machine), or serve the bundle's ONNX graphs with `act`/`serve --backend "
            "onnxruntime`"
        )
    return version


def current_target(device: int = 0) -> EngineTarget:
    """The TensorRT version and CUDA device `device` this process would build or run engines for."""
    version = require_tensorrt()
    cudart = import_cudart()
    props = check_cuda(cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})")
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return EngineTarget(version, name.strip("\0 "), f"{props.major}.{props.minor}")


def fused_attention_layers(engine_information: str) -> tuple[str, ...]:
    """Names of the layers running fused attention, from `get_engine_information(LayerInformationFormat.JSON)`.

    With profiling verbosity DETAILED each layer is an object (Name, LayerType, TacticName, ...); with less, only
    its name, which is then all there is to match.
    """
    found = []
    for layer in json.loads(engine_information).get("Layers", []):
        if isinstance(layer, str):
            name, tactic, layer_type = layer, "", ""
        else:
            name, tactic, layer_type = (str(layer.get(key, "")) for key in ("Name", "TacticName", "LayerType"))
        if layer_type.lower() in _ATTENTION_LAYER_TYPES or _FUSED_ATTENTION_NAME.search(f"{name} {tactic}"):
            found.append(name)
    return tuple(found)


@lru_cache(maxsize=1)
def _trt_logger() -> trt.ILogger:
    """One bridge from TensorRT's log to `logging` for the process: TensorRT keeps the first logger it is given."""
    import tensorrt as trt

    levels = {
        trt.ILogger.Severity.INTERNAL_ERROR: logging.ERROR,
        trt.ILogger.Severity.ERROR: logging.ERROR,
        trt.ILogger.Severity.WARNING: logging.WARNING,
        trt.ILogger.Severity.INFO: logging.DEBUG,  # per-layer build chatter
    }

    class LoggingBridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in levels:
                _LOG.log(levels[severity], "TensorRT: %s", msg)

    return LoggingBridge()


def _progress_monitor(graph: str) -> trt.IProgressMonitor:
    """Logs top-level build phases, and at most every 30 s the step reached, so a minutes-long build shows life."""
    import tensorrt as trt

    class BuildProgress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._lock = threading.Lock()  # TensorRT calls back from several builder threads
            self._steps: dict[str, int] = {}
            self._start = self._last = time.monotonic()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = num_steps
            level = logging.INFO if parent_phase is None else logging.DEBUG
            _LOG.log(level, "building %s: %s (%d steps)", graph, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                now = time.monotonic()
                if now - self._last >= _PROGRESS_INTERVAL_S:
                    self._last = now
                    total = self._steps.get(phase_name, 0)
                    _LOG.info(
                        "building %s: %s step %d/%d, %.0f s so far",
                        graph,
                        phase_name,
                        step + 1,
                        total,
                        now - self._start,
                    )
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            _LOG.debug("building %s: %s done", graph, phase_name)

    return BuildProgress()


def _dtype_name(dtype: trt.DataType) -> str:
    import tensorrt as trt

    names = {
        trt.DataType.FLOAT: "float32",
        trt.DataType.HALF: "float16",
        trt.DataType.BF16: "bfloat16",
        trt.DataType.INT32: "int32",
        trt.DataType.INT64: "int64",
        trt.DataType.INT8: "int8",
        trt.DataType.UINT8: "uint8",
        trt.DataType.BOOL: "bool",
    }
    return names.get(dtype, str(dtype))


def _dims(dims: trt.Dims) -> tuple[int, ...]:
    # Dims iterates at run time, but its stub declares only __len__/__getitem__, which mypy does not iterate.
    return tuple(dims[i] for i in range(len(dims)))


def check_engine_matches(spec: GraphSpec, engine: trt.ICudaEngine, source: str) -> None:
    """Checks a deserialized engine's I/O names, shapes and dtypes against `spec`."""
    import tensorrt as trt

    found: dict[trt.TensorIOMode, dict[str, tuple[tuple[int, ...], str]]] = {
        trt.TensorIOMode.INPUT: {},
        trt.TensorIOMode.OUTPUT: {},
    }
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        found[engine.get_tensor_mode(name)][name] = (
            _dims(engine.get_tensor_shape(name)),
            _dtype_name(engine.get_tensor_dtype(name)),
        )
    check_signature(spec, found[trt.TensorIOMode.INPUT], True, source)
    check_signature(spec, found[trt.TensorIOMode.OUTPUT], False, source)


def _network_flags() -> int:
    import tensorrt as trt

    # TensorRT 11 dropped weak typing and may drop the flag with it; on 10.x strong typing is opt-in.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _build_serialized(spec: GraphSpec, onnx_path: Path, options: BuildOptions, timing_cache: Path) -> bytes:
    import tensorrt as trt

    logger = _trt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags())
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"ONNX graph {onnx_path}: TensorRT {trt.__version__} could not parse it: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    outputs = [network.get_output(i) for i in range(network.num_outputs)]
    input_io = {tensor.name: (_dims(tensor.shape), _dtype_name(tensor.dtype)) for tensor in inputs}
    source = f"ONNX graph {onnx_path}"
    check_signature(spec, input_io, True, source)
    check_signature(
        spec, {tensor.name: (_dims(tensor.shape), _dtype_name(tensor.dtype)) for tensor in outputs}, False, source
    )

    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    dynamic = [tensor for tensor in spec.inputs if -1 in input_io[tensor.name][0]]
    if dynamic:  # an exporter that left dynamic axes: pin them to the spec, as the runner binds fixed buffers
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shape = trt.Dims(list(tensor.shape))
            profile.set_shape(tensor.name, shape, shape, shape)
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(spec.name)  # referenced until the build returns, as TensorRT requires
    config.progress_monitor = monitor
    cache = set_timing_cache(config, timing_cache)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{source}: TensorRT {trt.__version__} failed to build an engine (see its log above)")
    write_atomic(timing_cache, bytes(cache.serialize()))
    return bytes(serialized)


def set_timing_cache(config: trt.IBuilderConfig, path: Path) -> trt.ITimingCache:
    """The timing cache saved at `path`, set on `config`; a new one when TensorRT refuses it (made on a device of
    other properties, or damaged), which the build's cache then replaces."""
    cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    _LOG.warning("TensorRT timing cache %s: not usable on this device (or damaged); timing every tactic anew", path)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise EngineError(f"TensorRT could not set an empty timing cache (for {path})")
    return cache


def deserialize_engine(data: bytes, graph: str, rebuild_hint: str) -> tuple[trt.Runtime, trt.ICudaEngine]:
    """The engine and the runtime that must outlive it."""
    import tensorrt as trt

    runtime = trt.Runtime(_trt_logger())
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:  # the stubs say never; TensorRT returns None after logging why
        raise EngineError(
            f"engine for graph {graph!r}: TensorRT {trt.__version__} could not deserialize it (see its log above): "
            f"{rebuild_hint}"
        )
    return runtime, engine


def _engine_fused_attention(engine: trt.ICudaEngine) -> tuple[str, ...]:
    import tensorrt as trt

    inspector = engine.create_engine_inspector()
    return fused_attention_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def build_engine(
    spec: GraphSpec,
    onnx: OnnxSource,
    engine_path: Path,
    options: BuildOptions = DEFAULT_BUILD_OPTIONS,
    device: int = 0,
) -> tuple[EngineRecord, bytes]:
    """Builds an engine for `spec` from `onnx`, writes it and its record to `engine_path` (+ .json), returns both.

    Its timing cache is a file beside the engine; this is what `cosmos-edge engines build` calls.
    """
    writable_folder(engine_path.parent, "TensorRT engines")  # before minutes of building, not after
    target = current_target(device)
    check_cuda(import_cudart().cudaSetDevice(device), f"cudaSetDevice({device})")  # the builder uses the current one
    onnx_sha256 = onnx.sha256()
    cache_file = EngineCache(engine_path.parent).timing_cache_path(target)
    _LOG.info("building the TensorRT engine of %s from %s for %s", spec.name, onnx.path, target.describe())
    start = time.perf_counter()
    data = _build_serialized(spec, onnx.path, options, cache_file)
    seconds = time.perf_counter() - start
    runtime, engine = deserialize_engine(data, spec.name, cache_rebuild_hint(engine_path))
    fused_attention = _engine_fused_attention(engine)
    del engine, runtime  # the engine before the runtime that created it
    record = EngineRecord(
        graph=spec.name,
        file=engine_path.name,
        sha256=hashlib.sha256(data).hexdigest(),
        onnx_sha256=onnx_sha256,
        target=target,
        options=options,
        build_seconds=round(seconds, 1),
        fused_attention_layers=fused_attention,
    )
    write_engine(engine_path, record, data)
    _LOG.info(
        "built %s in %.0f s (%.1f MB); %d layers run fused attention",
        engine_path,
        seconds,
        len(data) / 1e6,
        len(record.fused_attention_layers),
    )
    return record, data
