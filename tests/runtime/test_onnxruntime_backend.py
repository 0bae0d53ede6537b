"""The ONNX Runtime runner: targets, input checks, lifecycle; the CUDA path with IO binding where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines import onnxruntime_runner
from cosmos_edge.runtime.engines.onnxruntime_runner import OnnxRuntimeRunner, OrtTarget, open_graph
from cosmos_edge.runtime.errors import ConfigError, EngineError, InputError
from tests.helpers.observations import TinyBundles


@pytest.fixture(scope="module")
def bundle(tiny_bundles: TinyBundles) -> Bundle:
    return Bundle.open(tiny_bundles("aloha"))


def dit_feeds(runner: OnnxRuntimeRunner) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {tensor.name: rng.standard_normal(tensor.shape).astype(np.float32) for tensor in runner.spec.inputs}


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("cpu", OrtTarget("cpu")),
        ("cuda", OrtTarget("cuda", 0)),
        ("cuda:1", OrtTarget("cuda", 1)),
        ("tensorrt:2", OrtTarget("tensorrt", 2)),
    ],
)
def test_targets_parse(device: str, expected: OrtTarget) -> None:
    assert OrtTarget.parse(device) == expected


@pytest.mark.parametrize("device", ["gpu", "cpu:0", "cuda:x", "", "cuda:\u0663"])
def test_bad_targets_are_named(device: str) -> None:
    with pytest.raises(ConfigError, match="device: expected 'cpu', 'cuda"):
        OrtTarget.parse(device)


def test_inputs_are_checked_by_name_and_shape(bundle: Bundle) -> None:
    runner = open_graph(bundle.graph_file("dit_b1"), "cpu")
    feeds = dit_feeds(runner)
    with pytest.raises(
        InputError,
        match=r"'dit_b1': expected inputs \['condition_mask', 'text_k', 'text_v', 'timesteps', 'x'\]",
    ):
        runner.run({name: value for name, value in feeds.items() if name != "text_v"})
    with pytest.raises(InputError, match=r"input 'timesteps': expected float32\[1, 11\], got float32\[1, 10\]"):
        runner.run({**feeds, "timesteps": feeds["timesteps"][:, :10]})
    outputs = runner.run({name: value.astype(np.float64) for name, value in feeds.items()})  # cast to float32
    assert outputs["velocity"].shape == (1, 16, 11, 28, 28) and outputs["velocity"].dtype == np.float32


def test_a_constant_input_gives_the_same_output_and_is_then_left_out(bundle: Bundle) -> None:
    runner = open_graph(bundle.graph_file("dit_b1"), "cpu")
    feeds = dit_feeds(runner)
    expected = runner.run(feeds)["velocity"]
    for name in ("text_k", "text_v"):
        runner.set_constant_input(name, feeds.pop(name))
    np.testing.assert_array_equal(runner.run(feeds)["velocity"], expected)
    with pytest.raises(InputError, match=r"\['text_k'\] were set with set_constant_input"):
        runner.run({**feeds, "text_k": np.zeros(runner.spec.inputs[3].shape, np.float32)})
    with pytest.raises(InputError, match="expected one of inputs"):
        runner.set_constant_input("prompt", np.zeros(1, np.float32))
    with pytest.raises(InputError, match=r"input .text_k.: expected float32\[2, 1, 2, 512, 32\]"):
        runner.set_constant_input("text_k", np.zeros((1, 3, 3), np.float32))


def test_run_after_close_is_an_engine_error(bundle: Bundle) -> None:
    runner = open_graph(bundle.graph_file("dit_b1"), "cpu")
    feeds = dit_feeds(runner)
    runner.close()
    with pytest.raises(EngineError, match=r"graph dit_b1: run\(\) after close\(\)"):
        runner.run(feeds)
    with pytest.raises(EngineError, match=r"graph dit_b1: set_constant_input\(\) after close\(\)"):
        runner.set_constant_input("text_k", feeds["text_k"])


def test_device_buffers_that_cannot_be_allocated_are_one_engine_error(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a GPU out of memory: the session starts, its IO-binding buffers cannot be made.
    cpu_session = onnxruntime_runner._create_session
    monkeypatch.setattr(
        onnxruntime_runner, "_create_session", lambda path, target, cache: cpu_session(path, OrtTarget("cpu"), cache)
    )

    def out_of_memory(*args: object) -> None:
        raise RuntimeError("CUDA failure 2: out of memory")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", out_of_memory)
    graph = bundle.graph_file("dit_b1")
    with pytest.raises(
        EngineError,
        match=r"graph dit_b1 \(.*dit_b1\.onnx\): onnxruntime failed allocating its device buffers: CUDA failure 2",
    ):
        OnnxRuntimeRunner(graph.onnx, graph.spec, OrtTarget("cuda"))


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu installed")
def test_gpu_target_without_onnxruntime_gpu_says_what_to_install(bundle: Bundle) -> None:
    with pytest.raises(
        ConfigError, match=r"device: 'cuda:0' needs onnxruntime's CUDAExecutionProvider.*onnxruntime-gpu"
    ):
        open_graph(bundle.graph_file("dit_b1"), "cuda")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu installed")
@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # onnxruntime's word for the fallback
def test_a_provider_listed_but_not_started_is_an_error_not_a_silent_fallback(
    bundle: Bundle, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # As onnxruntime-gpu whose CUDA libraries fail to load: listed as available, and its session runs on the CPU.
    listed = [*ort.get_available_providers(), "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)
    with pytest.raises(EngineError, match=r"dit_b1.onnx: onnxruntime could not start CUDAExecutionProvider"):
        open_graph(bundle.graph_file("dit_b1"), "cuda")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(EngineError, match=f"{not_a_folder / 'cache'}: cannot make the folder"):
        OnnxRuntimeRunner(
            bundle.file(bundle.manifest.graphs["dit_b1"].file),
            bundle.manifest.graphs["dit_b1"].spec,
            OrtTarget("tensorrt"),
            cache_dir=not_a_folder / "cache",
        )


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu")
def test_cuda_provider_with_io_binding_matches_the_cpu(bundle: Bundle) -> None:
    cpu, cuda = open_graph(bundle.graph_file("dit_b1"), "cpu"), open_graph(bundle.graph_file("dit_b1"), "cuda")
    feeds = dit_feeds(cpu)
    expected = cpu.run(feeds)["velocity"]
    for _ in range(2):  # the bound device buffers are reused by every call
        got = cuda.run(feeds)["velocity"]
        assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-2  # TF32 matmuls on the GPU
    cuda.close()


def test_a_read_only_tensorrt_engine_cache_serves_the_engines_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(onnxruntime_runner.os, "access", lambda path, mode: False)  # as a read-only mount would say
    empty, filled = tmp_path / "empty", tmp_path / "filled"
    empty.mkdir()
    (filled / "onnxruntime-1.x").mkdir(parents=True)
    with pytest.raises(EngineError, match=r"empty: not writable, so it cannot hold ONNX Runtime's TensorRT engines"):
        onnxruntime_runner._check_engine_cache(empty)
    for _ in range(2):  # a bundle's graphs share the folder: said once
        onnxruntime_runner._check_engine_cache(filled)  # a deployment that only serves the engines built before
    assert caplog.text.count("filled: read-only; ONNX Runtime's TensorRT engines are used from it") == 1
