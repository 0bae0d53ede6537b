"""The exported graphs: ONNX Runtime fp32 against eager torch fp32, and the structure TensorRT needs to fuse them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cosmos_edge.export import onnx_export
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.graph import GraphSpec, TensorSpec, dit_graph
from cosmos_edge.runtime.engines.onnxruntime_runner import OnnxRuntimeRunner
from cosmos_edge.runtime.errors import EngineError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.dit import Attention, explicit_attention_mode
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.latents import BLACK, black_prefix_frames
from tests.helpers.observations import TinyBundles

REL_TOL = 1e-4  # max|onnxruntime - torch| / max|torch| at fp32
TEXT_TOKENS = 512


def rel_err(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / np.abs(expected).max())


def dit_inputs(batch: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Plausible inputs of the tiny ALOHA DiT graph: noisy latents, per-frame timesteps (0 on the conditioning
    frames), a 0/1 mask; and an instruction's embedding."""
    config = dit_config("tiny")
    spec = dit_graph(platform_spec("aloha"), batch, config.text_kv_shape(TEXT_TOKENS))
    rng = np.random.default_rng(seed)
    x, timesteps, mask = spec.inputs[:3]
    conditioning = rng.random(timesteps.shape) < 0.4
    feeds = {
        x.name: rng.standard_normal(x.shape).astype(np.float32),
        timesteps.name: np.where(conditioning, 0.0, rng.uniform(0.5, 1.0, timesteps.shape)).astype(np.float32),
        mask.name: np.broadcast_to(conditioning[:, None, :, None, None], mask.shape).astype(np.float32),
    }
    return feeds, rng.standard_normal((1, TEXT_TOKENS, config.text_dim)).astype(np.float32)


@pytest.fixture(scope="module")
def aloha_bundle(tiny_bundles: TinyBundles) -> Bundle:
    return Bundle.open(tiny_bundles("aloha"))


def test_dit_graphs_match_torch_fp32(aloha_bundle: Bundle, tiny_assets: dict[str, CheckpointFiles]) -> None:
    # The text-K/V graph's keys and values, given to the DiT graph, make the network's output from the embedding.
    graphs = ("dit_text_kv", "dit_b2")
    text_kv, dit_b2 = (OnnxRuntimeRunner(aloha_bundle.graph_file(n).onnx, aloha_bundle.graph(n).spec) for n in graphs)
    feeds, text = dit_inputs(2, seed=0)
    dit = load_dit(tiny_assets["aloha"].checkpoint)
    with torch.no_grad():
        expected_kv = dit.precompute_text_kv(torch.from_numpy(text))
        expected = dit(*map(torch.from_numpy, feeds.values()), torch.from_numpy(text)).numpy()
    keys_values = text_kv.run({"text_embedding": text})
    assert rel_err(keys_values["text_k"], expected_kv.k.numpy()) <= REL_TOL
    assert rel_err(keys_values["text_v"], expected_kv.v.numpy()) <= REL_TOL
    assert rel_err(dit_b2.run({**feeds, **keys_values})["velocity"], expected) <= REL_TOL


@pytest.mark.parametrize(("name", "prefix_frames"), [("libero", 13), ("aloha", 17)])  # 1 + 4 x (slots - 1)
def test_cameras_encoder_graph_gives_the_prefix_latents_of_torch_fp32(
    name: str, prefix_frames: int, tiny_bundles: TinyBundles, tiny_assets: dict[str, CheckpointFiles]
) -> None:
    # The graph takes the camera frames; the black frames before them are constants inside it.
    bundle = Bundle.open(tiny_bundles(name))
    spec = bundle.graph("vae_encoder_cameras").spec
    runner = OnnxRuntimeRunner(bundle.graph_file("vae_encoder_cameras").onnx, spec)
    platform = platform_spec(name)
    cameras = np.random.default_rng(1).uniform(-1, 1, spec.inputs[0].shape).astype(np.float32)
    black = np.full((1, 3, black_prefix_frames(platform), *cameras.shape[3:]), BLACK, np.float32)
    prefix = np.concatenate([black, cameras], axis=2)
    assert prefix.shape[2] == prefix_frames
    with torch.no_grad():
        expected = load_wan_vae(tiny_assets[name].tokenizer).encode(torch.from_numpy(prefix)).numpy()
    assert rel_err(runner.run({"video": cameras})["latent"], expected) <= REL_TOL


def test_an_output_shape_the_spec_gets_wrong_fails_the_export(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    # The file's output shapes are written from the spec: a wrong spec must not make a graph that looks right.
    vae = load_wan_vae(tiny_assets["aloha"].tokenizer)
    wrong = GraphSpec("decoder", (TensorSpec("latent", (1, 16, 1, 2, 2)),), (TensorSpec("video", (1, 3, 9, 99, 99)),))
    with pytest.raises(EngineError, match=r"decoder.onnx \(traced\) output 'video': expected float32\[1, 3, 9, 99"):
        onnx_export.export_vae_decoder(vae, wrong, tmp_path / "decoder.onnx")
    assert not (tmp_path / "decoder.onnx").exists()


@pytest.mark.parametrize("half", ["encoder", "decoder"])
def test_vae_graphs_match_torch_fp32(half: str, tiny_assets: dict[str, CheckpointFiles], tmp_path: Path) -> None:
    # The exporter is shape-generic: a short, small clip exercises every VAE layer in a fraction of the time.
    vae = load_wan_vae(tiny_assets["aloha"].tokenizer)
    video, latent = TensorSpec("video", (1, 3, 9, 32, 32)), TensorSpec("latent", (1, 16, 3, 4, 4))
    if half == "encoder":
        spec = GraphSpec("encoder", (video,), (latent,))
        exported = onnx_export.export_vae_encoder(vae, spec, tmp_path / "encoder.onnx")
        reference = vae.encode
    else:
        spec = GraphSpec("decoder", (latent,), (video,))
        exported = onnx_export.export_vae_decoder(vae, spec, tmp_path / "decoder.onnx")
        reference = vae.decode
    source = np.random.default_rng(2).uniform(-1, 1, spec.inputs[0].shape).astype(np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(source)).numpy()
    got = OnnxRuntimeRunner(exported.path, spec).run({spec.input_names[0]: source})[spec.output_names[0]]
    assert rel_err(got, expected) <= REL_TOL


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in graph.node for output in node.output}


def constant_shapes(graph: onnx.GraphProto) -> list[tuple[int, ...]]:
    from_nodes = [
        tuple(attribute.t.dims) for node in graph.node if node.op_type == "Constant" for attribute in node.attribute
    ]
    return from_nodes + [tuple(tensor.dims) for tensor in graph.initializer]


def test_dit_attention_is_the_pattern_tensorrt_fuses(aloha_bundle: Bundle) -> None:
    graph = onnx.load(str(aloha_bundle.graph_file("dit_b1").onnx)).graph
    produced_by = producers(graph)
    constants = {name for name, node in produced_by.items() if node.op_type == "Constant"}
    constants |= {tensor.name for tensor in graph.initializer}
    softmaxes = [node for node in graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == 2 * dit_config("tiny").num_blocks  # self- and cross-attention of every block
    for softmax in softmaxes:
        # Nothing between the first MatMul and the Softmax, which normalises the key axis.
        scores = produced_by[softmax.input[0]]
        assert scores.op_type == "MatMul", softmax.name
        assert {attribute.name: attribute.i for attribute in softmax.attribute}.get("axis") in (-1, 3)
        # The scale multiplies Q (a Mul or Div by a constant) before that MatMul; K arrives transposed.
        scaled_q, keys = (produced_by[name] for name in scores.input)
        assert scaled_q.op_type in ("Mul", "Div") and any(name in constants for name in scaled_q.input), softmax.name
        assert keys.op_type == "Transpose", softmax.name
        # The probabilities feed the second MatMul directly.
        consumers = [node for node in graph.node if softmax.output[0] in node.input]
        assert [node.op_type for node in consumers] == ["MatMul"], softmax.name


def test_dit_graph_is_real_valued_with_constant_rope_tables(aloha_bundle: Bundle) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(aloha_bundle.graph_file("dit_b1").onnx)))
    graph = model.graph
    complex_types = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}
    values = [*graph.value_info, *graph.input, *graph.output]
    assert not any(value.type.tensor_type.elem_type in complex_types for value in values)
    assert not any(tensor.data_type in complex_types for tensor in graph.initializer)
    ops = Counter(node.op_type for node in graph.node)
    assert not {"DFT", "STFT", "Einsum"} & set(ops)
    # The only cos/sin left are the timestep sinusoid's; RoPE arrives as two [1, 1, T*H*W, head_dim] tables.
    assert ops["Cos"] == ops["Sin"] == 1
    platform = aloha_bundle.manifest.platform
    rope_shape = (1, 1, platform.num_latent_frames * 14 * 14, dit_config("tiny").head_dim)
    assert constant_shapes(graph).count(rope_shape) == 2


def test_large_graphs_keep_their_weights_in_one_external_file(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    vae = load_wan_vae(tiny_assets["aloha"].tokenizer)
    spec = GraphSpec("decoder", (TensorSpec("latent", (1, 16, 1, 2, 2)),), (TensorSpec("video", (1, 3, 1, 16, 16)),))
    exported = onnx_export.export_vae_decoder(vae, spec, tmp_path / "decoder.onnx")
    assert exported.external_data == tmp_path / "decoder.onnx.data"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    latent = np.random.default_rng(3).standard_normal((1, 16, 1, 2, 2)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latent)).numpy()
    assert rel_err(OnnxRuntimeRunner(exported.path, spec).run({"latent": latent})["video"], expected) <= REL_TOL


def test_export_attention_mode_matches_sdpa_and_is_scoped(tiny_assets: dict[str, CheckpointFiles]) -> None:
    dit = load_dit(tiny_assets["aloha"].checkpoint)
    feeds, text = dit_inputs(1, seed=4)
    inputs = [torch.from_numpy(array) for array in (*feeds.values(), text)]
    with torch.no_grad():
        eager = dit(*inputs)
        with explicit_attention_mode(dit):
            assert all(module.explicit for module in dit.modules() if isinstance(module, Attention))
            explicit = dit(*inputs)
    assert not any(module.explicit for module in dit.modules() if isinstance(module, Attention))
    torch.testing.assert_close(explicit, eager, rtol=0, atol=1e-5)
