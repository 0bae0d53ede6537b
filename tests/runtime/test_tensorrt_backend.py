"""The TensorRT backend: its pure-Python parts everywhere; engines on a machine with TensorRT and a CUDA GPU.

TensorRT cannot be installed on development or CI machines (its wheels are not on PyPI): the tests marked
`tensorrt` skip there with the reason, and run where `tensorrt` imports and cuda-python sees a device.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import cast

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from cosmos_edge.runtime.engines.graph import GraphFile, GraphSpec, TensorSpec, check_feeds, check_signature
from cosmos_edge.runtime.engines.tensorrt import runner as runner_module
from cosmos_edge.runtime.engines.tensorrt.build import (
    TENSORRT_MISSING,
    fused_attention_layers,
    require_tensorrt,
    tensorrt_version,
)
from cosmos_edge.runtime.engines.tensorrt.cache import (
    BuildOptions,
    EngineCache,
    EngineRecord,
    OnnxSource,
    engine_cache_key,
    record_path,
)
from cosmos_edge.runtime.engines.tensorrt.cuda_buffers import DeviceIO, IOBuffer
from cosmos_edge.runtime.engines.tensorrt.runner import TensorRTRunner, open_graph
from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from tests.helpers.fake_cudart import RecordingCudart

SEQ, CONTEXT, DIM, HEADS = 256, 64, 256, 4  # head dim 64: inside TensorRT's fused-MHA limits (16..256, % 8)
ATTENTION = GraphSpec(
    "attention_b1",
    inputs=(TensorSpec("x", (1, SEQ, DIM)), TensorSpec("context", (1, CONTEXT, DIM))),
    outputs=(TensorSpec("y", (1, SEQ, DIM)),),
)


def _cuda_devices() -> int:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return 0
    error, count = cudart.cudaGetDeviceCount()
    return int(count) if int(error) == 0 else 0


needs_tensorrt = pytest.mark.skipif(
    tensorrt_version() is None or _cuda_devices() == 0,
    reason="needs TensorRT >= 10 and a CUDA device (TensorRT's wheels are not on PyPI; see the module docstring)",
)


# ---- pure Python: every machine ----


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


def test_runner_without_tensorrt_says_what_to_install(no_tensorrt: None, tmp_path: Path) -> None:
    assert tensorrt_version() is None
    with pytest.raises(EngineError) as raised:
        TensorRTRunner.from_onnx(ATTENTION, OnnxSource(tmp_path / "a.onnx"), tmp_path)
    assert str(raised.value) == TENSORRT_MISSING
    assert "pip install 'cosmos-edge[tensorrt,gpu]'" in TENSORRT_MISSING and "--backend onnxruntime" in TENSORRT_MISSING
    with pytest.raises(EngineError, match="backend 'tensorrt' is not installed"):
        TensorRTRunner.from_engine(ATTENTION, tmp_path / "a.engine")


def test_stubs_alone_are_not_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs a `tensorrt` folder of .pyi files: it imports as an empty namespace package.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert tensorrt_version() is None
    with pytest.raises(EngineError, match="backend 'tensorrt' is not installed"):
        require_tensorrt()


def test_old_tensorrt_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = types.ModuleType("tensorrt")
    old.__dict__.update(__version__="8.6.1", Builder=object)
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(EngineError, match=r"expected TensorRT >= 10, got 8\.6\.1"):
        require_tensorrt()


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "gpu:0", "cuda:", "cuda:\u0663"])
def test_open_graph_needs_a_cuda_device(device: str) -> None:
    graph = cast(GraphFile, types.SimpleNamespace())  # refused before the graph is read
    with pytest.raises(ConfigError, match=rf"device: expected 'cuda' or 'cuda:N', got '{device}'"):
        open_graph(graph, device)


def _layer(name: str, layer_type: str = "kgen", tactic: str = "") -> dict[str, object]:
    return {"Name": name, "LayerType": layer_type, "TacticName": tactic, "Metadata": "[ONNX Layer: /attn/MatMul]"}


def test_fused_attention_layers_from_the_inspector() -> None:
    info = {
        "Layers": [
            _layer("/blocks.0/self_attn/q_proj/MatMul", "gemm", "sm90_xmma_gemm_bf16bf16"),
            _layer("_gemm_mha_v2_myl0_17", "kgen", "_gemm_mha_v2_0x957a2fe283f77dcf35c142c1390a3e6a"),
            _layer("__myl_fc_myl0_18", "kgen", "sm90_fmha_v2_flash_attention_bf16_64_128"),
            _layer("/blocks.0/attn/Attention", "Attention"),
            # Named after the ONNX nodes it came from, not a fused kernel:
            _layer("/encoder/layers_2/mha/attn/mha_prob/key/MatMul", "gemm", "sm80_xmma_gemm_f16f16"),
            _layer("[MATRIX_MULTIPLY]_[scaled_dot_product_attention]_[x11_qk]", "gemm", "sm80_xmma_gemm_f16f16"),
        ],
        "Bindings": ["x", "y"],
    }
    assert fused_attention_layers(json.dumps(info)) == (
        "_gemm_mha_v2_myl0_17",
        "__myl_fc_myl0_18",
        "/blocks.0/attn/Attention",
    )


def test_fused_attention_from_layer_names_only() -> None:
    # Without DETAILED profiling verbosity the inspector lists names only.
    info = {"Layers": ["__myl_Mul_myl0_3", "_gemm_mha_v2_myl0_4", "__myl_Add_myl0_5"]}
    assert fused_attention_layers(json.dumps(info)) == ("_gemm_mha_v2_myl0_4",)


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {tensor.name: rng.standard_normal(tensor.shape).astype(np.float32) for tensor in ATTENTION.inputs}


def test_run_inputs_must_be_exactly_the_streamed_ones() -> None:
    inputs = _inputs()
    assert check_feeds(ATTENTION, inputs, frozenset()) == ("x", "context")
    assert check_feeds(ATTENTION, {"x": inputs["x"]}, frozenset({"context"})) == ("x",)
    with pytest.raises(InputError, match=r"expected inputs \['context', 'x'\], got \['x'\]"):
        check_feeds(ATTENTION, {"x": inputs["x"]}, frozenset())
    with pytest.raises(InputError, match=r"\['context'\] were set with set_constant_input, leave them out"):
        check_feeds(ATTENTION, inputs, frozenset({"context"}))


@pytest.mark.parametrize(
    ("array", "got"),
    [
        (np.zeros((1, SEQ, DIM + 1), np.float32), rf"float32\[1, {SEQ}, {DIM + 1}\]"),
        (np.zeros((1, SEQ, DIM), np.complex64), rf"complex64\[1, {SEQ}, {DIM}\]"),
    ],
)
def test_run_inputs_are_checked_in_shape_and_dtype(array: np.ndarray, got: str) -> None:
    inputs = {**_inputs(), "x": array}
    with pytest.raises(InputError, match=rf"input 'x': expected float32\[1, {SEQ}, {DIM}\], got {got}"):
        check_feeds(ATTENTION, inputs, frozenset())


def test_a_runner_is_closed_with_its_own_gpu_current(monkeypatch: pytest.MonkeyPatch) -> None:
    cudart = RecordingCudart()
    monkeypatch.setattr(runner_module, "import_cudart", lambda: cudart)
    spec = TensorSpec("x", (2,), "float32")
    io = DeviceIO(cudart, "stream", {"x": IOBuffer(spec, np.zeros(2, np.float32), 1, 2)}, {})  # type: ignore[arg-type]
    record = cast(EngineRecord, None)
    runner = TensorRTRunner(ATTENTION, record, object(), object(), object(), io, device=1)  # type: ignore[arg-type]
    runner.close()
    names = [name for name, _ in cudart.calls]
    assert cudart.calls[0] == ("cudaSetDevice", 1)
    assert names.index("cudaSetDevice") < names.index("cudaFree") < names.index("cudaStreamDestroy")


def test_engine_io_must_match_the_spec() -> None:
    inputs = {"x": ((1, SEQ, DIM), "float32"), "context": ((-1, CONTEXT, DIM), "float32")}
    check_signature(ATTENTION, inputs, True, "ONNX graph a.onnx")  # -1: a dynamic dim, pinned by a profile
    with pytest.raises(EngineError, match=r"expected inputs \['context', 'x'\] \(GraphSpec 'attention_b1'\)"):
        check_signature(ATTENTION, {"x": inputs["x"]}, True, "ONNX graph a.onnx")
    bf16 = {"y": ((1, SEQ, DIM), "bfloat16")}
    with pytest.raises(EngineError, match=r"output 'y': expected float32\[1, 256, 256\] .* got bfloat16"):
        check_signature(ATTENTION, bf16, False, "engine a.engine")


# ---- TensorRT and a CUDA GPU ----


class TinyAttention(nn.Module):
    """Self- then cross-attention, float32 at the boundary; the scale is on Q before the first MatMul and nothing
    sits between that MatMul and the Softmax: the pattern TensorRT fuses (deployment_anchors D.4)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.q = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.kv, self.out = nn.Linear(DIM, 2 * DIM), nn.Linear(DIM, DIM)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        def heads(t: Tensor) -> Tensor:  # [B, L, D] -> [B, H, L, D/H]
            return t.unflatten(-1, (HEADS, DIM // HEADS)).transpose(1, 2)

        scores = (heads(q) * (DIM // HEADS) ** -0.5) @ heads(k).transpose(-2, -1)
        return (scores.softmax(-1) @ heads(v)).transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = x.to(self.out.weight.dtype)
        h = h + self.attend(*self.qkv(h).chunk(3, dim=-1))
        h = h + self.attend(self.q(h), *self.kv(context.to(h.dtype)).chunk(2, dim=-1))
        return self.out(h).float()


Exported = dict[str, tuple[OnnxSource, TinyAttention]]


@pytest.fixture(scope="module")
def attention_onnx(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The attention graph exported by the bundle exporter at fp32 and at bf16, with its torch module."""
    export = pytest.importorskip("cosmos_edge.export.onnx_export")
    root = tmp_path_factory.mktemp("attention_onnx")
    graphs = {}
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        torch.manual_seed(0)
        module = TinyAttention().to(dtype).eval()
        exported = export.export_graph(module, ATTENTION, root / f"attention_{precision}.onnx")
        graphs[precision] = (OnnxSource(exported.path, exported.files[1:]), module)
    return graphs


def _relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_fp32_engine_matches_onnxruntime(attention_onnx: Exported, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    source, _ = attention_onnx["fp32"]
    inputs = _inputs(1)
    (expected,) = ort.InferenceSession(str(source.path), providers=["CPUExecutionProvider"]).run(None, inputs)
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as runner:
        got = runner.run(inputs)["y"]
    assert _relative_error(got, expected) < 5e-3  # TF32 matmuls: TensorRT enables them for FP32 by default


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_bf16_engine_matches_torch_replays_and_keeps_constants(attention_onnx: Exported, tmp_path: Path) -> None:
    source, module = attention_onnx["bf16"]
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as runner:
        assert runner.record.target.tensorrt_version == tensorrt_version()
        context = _inputs(99)["context"]
        runner.set_constant_input("context", context)
        for seed in range(3):  # eager + capture, then CUDA-graph replays with new inputs
            x = _inputs(seed)["x"]
            with torch.no_grad():
                expected = module(torch.from_numpy(x), torch.from_numpy(context)).numpy()
            got = runner.run({"x": x})["y"]
            assert _relative_error(got, expected) < 3e-2, seed  # bf16 inside, both sides


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_fused_attention_is_reported(attention_onnx: Exported, tmp_path: Path) -> None:
    source, _ = attention_onnx["bf16"]
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as runner:
        record = runner.record
    assert len(record.fused_attention_layers) >= 1, "no fused attention layer in the engine inspector's report"
    assert record.manifest_entry()["fused_attention_count"] == len(record.fused_attention_layers)


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_cached_engine_is_reused(attention_onnx: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cosmos_edge.runtime.engines.tensorrt import runner as tensorrt_runner

    source, _ = attention_onnx["bf16"]
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as first:
        built = first.record

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached engine was rebuilt")

    monkeypatch.setattr(tensorrt_runner, "build_engine", no_rebuild)
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as second:
        assert second.record == built
        assert second.run(_inputs())["y"].shape == (1, SEQ, DIM)
    assert list(tmp_path.glob("timing-*.cache"))


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_engine_for_another_target_is_refused(attention_onnx: Exported, tmp_path: Path) -> None:
    source, _ = attention_onnx["bf16"]
    with TensorRTRunner.from_onnx(ATTENTION, source, tmp_path) as runner:
        record = runner.record
    engine = EngineCache(tmp_path).engine_path(
        ATTENTION.name, engine_cache_key(source.sha256(), record.target, BuildOptions())
    )
    forged = dataclasses.replace(
        record, target=dataclasses.replace(record.target, tensorrt_version="9.9.9", gpu="Fake")
    )
    record_path(engine).write_text(json.dumps(dataclasses.asdict(forged)))
    assert EngineRecord.from_dict(json.loads(record_path(engine).read_text()), "x") == forged

    with pytest.raises(EngineError) as raised:
        TensorRTRunner.from_engine(ATTENTION, engine)
    assert "built for TensorRT 9.9.9 on Fake" in str(raised.value)
    assert "cosmos-edge engines build" in str(raised.value)
    with pytest.raises(EngineError, match=r"delete .*\.engine and .*\.json, and the next run rebuilds it"):
        TensorRTRunner.from_onnx(ATTENTION, source, tmp_path)


@pytest.mark.tensorrt
@pytest.mark.gpu
@needs_tensorrt
def test_tiny_dit_engine_matches_torch(tmp_path: Path) -> None:
    export = pytest.importorskip("cosmos_edge.export.onnx_export")
    from cosmos_edge.runtime.engines.graph import dit_graph
    from cosmos_edge.runtime.models.dit import CosmosDiT
    from cosmos_edge.runtime.models.dit_config import dit_config
    from cosmos_edge.runtime.platforms import platform_spec

    config = dit_config("tiny")
    torch.manual_seed(0)
    dit = CosmosDiT(config).to(torch.bfloat16).eval()
    platform = platform_spec("aloha")
    spec = dit_graph(platform, batch=1, text_kv=config.text_kv_shape(16))
    exported = export.export_dit(dit, spec, tmp_path / f"{spec.name}.onnx")
    rng = np.random.default_rng(0)
    with torch.no_grad():
        text_kv = dit.precompute_text_kv(torch.from_numpy(rng.standard_normal((1, 16, config.text_dim))).float())
    clean = platform.num_conditional_frames
    timesteps, condition_mask = np.full(spec.inputs[1].shape, 0.6, np.float32), spec.inputs[2].zeros()
    timesteps[:, :clean], condition_mask[:, :, :clean] = 0.0, 1.0
    inputs = {
        "x": rng.standard_normal(spec.inputs[0].shape).astype(np.float32),
        "timesteps": timesteps,
        "condition_mask": condition_mask,
        "text_k": text_kv.k.float().numpy(),
        "text_v": text_kv.v.float().numpy(),
    }
    with torch.no_grad():
        expected = export.DiTGraph(dit, spec)(*(torch.from_numpy(inputs[name]) for name in spec.input_names)).numpy()
    source = OnnxSource(exported.path, exported.files[1:])
    with TensorRTRunner.from_onnx(spec, source, tmp_path) as runner:
        got = runner.run(inputs)["velocity"]
        assert runner.record.fused_attention_layers
    assert _relative_error(got, expected) < 5e-2
