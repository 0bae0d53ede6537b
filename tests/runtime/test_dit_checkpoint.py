"""DiT checkpoints: official `.pt` and diffusers directories load with strict keys; config inference; safety."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import Tensor

from cosmos_edge.runtime.errors import CheckpointError, ConfigError
from cosmos_edge.runtime.models.checkpoint_inspection import inspect_checkpoint
from cosmos_edge.runtime.models.dit import CosmosDiT
from cosmos_edge.runtime.models.dit_checkpoint import (
    diffusers_to_official_key,
    dit_from_state_dict,
    load_dit,
    official_to_diffusers_key,
    random_dit_state_dict,
    read_dit_state_dict,
    summarize_dit_state_dict,
)
from cosmos_edge.runtime.models.dit_config import DIT_PRESETS, DiTConfig, dit_config
from tests.helpers.official_state_dicts import official_dit_state_dict

TINY = dit_config("tiny")
FRAMES, SIZE = 3, 8  # small inputs: these tests compare weights and outputs, not numerics


def inferred_config(state: dict[str, Tensor]) -> DiTConfig:
    """The configuration `checkpoint inspect` infers from a state dict's shapes."""
    return DiTConfig(**summarize_dit_state_dict(state)["config"])


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, Tensor]:
    return random_dit_state_dict(TINY, seed=7)


@pytest.fixture(scope="module")
def tiny_inputs() -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, FRAMES, SIZE, SIZE)
    mask[:, :, :1] = 1.0
    return {
        "x": torch.randn(1, 16, FRAMES, SIZE, SIZE, generator=generator),
        "timesteps": torch.tensor([[0.0, 0.7, 0.7]]),
        "condition_mask": mask,
        "text": torch.randn(1, 6, TINY.text_dim, generator=generator),
    }


def with_bookkeeping(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Adds the non-parameter keys official checkpoints carry: TE extra state, training counters, RoPE buffers."""
    return {
        **state,
        "net.blocks.0.self_attn.q_norm._extra_state": torch.zeros(4, dtype=torch.uint8),
        "net.final_layer.linear._extra_state": torch.zeros(0, dtype=torch.uint8),
        "net.accum_video_sample_counter": torch.tensor(12),
        "net.accum_iteration": torch.tensor(3),
        "net.pos_embedder.seq": torch.arange(128.0),
        "net.pos_embedder.dim_spatial_range": torch.zeros(5),
        "net.pos_embedder.dim_temporal_range": torch.zeros(6),
    }


def assert_same_weights(model: CosmosDiT, state: dict[str, Tensor]) -> None:
    loaded = official_dit_state_dict(model)
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value.to(loaded[key].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("wrapped", [False, True], ids=["flat", "wrapped-under-model"])
def test_official_pt_round_trip(tmp_path: Path, tiny_state: dict[str, Tensor], wrapped: bool) -> None:
    path = tmp_path / "model.pt"
    payload = with_bookkeeping(tiny_state)
    torch.save({"model": payload} if wrapped else payload, path)

    model = load_dit(path)

    assert model.config == TINY
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert_same_weights(model, tiny_state)


def test_loaded_model_computes_like_the_in_memory_one(
    tmp_path: Path, tiny_state: dict[str, Tensor], tiny_inputs: dict[str, Tensor]
) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_state, path)
    with torch.inference_mode():
        torch.testing.assert_close(
            load_dit(path)(**tiny_inputs), dit_from_state_dict(tiny_state)(**tiny_inputs), rtol=0, atol=0
        )


def test_missing_key_is_named(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "model.pt"
    torch.save({k: v for k, v in tiny_state.items() if k != "net.blocks.1.mlp.layer2.weight"}, path)
    with pytest.raises(CheckpointError, match=r"missing \[net\.blocks\.1\.mlp\.layer2\.weight\], unexpected \[\]"):
        load_dit(path)


@pytest.mark.parametrize(
    "key",
    [
        "net.blocks.0.self_attn.q_norm.weight",
        "net.blocks.0.cross_attn.k_proj.weight",
        "net.blocks.0.mlp.layer1.weight",
        "net.blocks.0.adaln_modulation_self_attn.1.weight",
    ],
)
def test_a_key_the_size_is_read_from_missing_from_block_0_alone_is_listed_as_missing(
    tiny_state: dict[str, Tensor], key: str
) -> None:
    summary = summarize_dit_state_dict({name: tensor for name, tensor in tiny_state.items() if name != key})
    assert summary["config"] == dataclasses.asdict(TINY)
    assert summary["missing_keys"] == [key]


def test_unexpected_key_is_named(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "model.pt"
    torch.save({**tiny_state, "net.blocks.0.self_attn.bias": torch.zeros(64)}, path)
    with pytest.raises(CheckpointError, match=r"missing \[\], unexpected \[net\.blocks\.0\.self_attn\.bias\]"):
        load_dit(path)


def test_code_running_pickle_is_refused(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self) -> tuple:
            return (Path.touch, (marker,))  # harmless stand-in for os.system

    path = tmp_path / "model.pt"
    torch.save({**tiny_state, "payload": Payload()}, path)

    with pytest.raises(CheckpointError, match="refused"):
        load_dit(path)
    assert not marker.exists()


def save_diffusers_transformer(state: dict[str, Tensor], directory: Path) -> None:
    """Writes `state` as diffusers would: CosmosTransformer3DModel.save_pretrained (config.json + safetensors)."""
    transformer_cosmos = pytest.importorskip("diffusers.models.transformers.transformer_cosmos")
    config = inferred_config(state)
    model = transformer_cosmos.CosmosTransformer3DModel(
        in_channels=config.in_channels + 1,
        out_channels=config.out_channels,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        num_layers=config.num_blocks,
        mlp_ratio=config.mlp_hidden / config.model_channels,
        text_embed_dim=config.text_dim,
        adaln_lora_dim=config.adaln_lora_dim,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    )
    model.load_state_dict({official_to_diffusers_key(k.removeprefix("net.")): v for k, v in state.items()})
    model.save_pretrained(directory)


@pytest.mark.parametrize("layout", ["pipeline-dir", "transformer-dir"])
def test_diffusers_directory_round_trip(tmp_path: Path, tiny_state: dict[str, Tensor], layout: str) -> None:
    save_diffusers_transformer(tiny_state, tmp_path / "transformer")

    model = load_dit(tmp_path if layout == "pipeline-dir" else tmp_path / "transformer")

    assert model.config == TINY  # RoPE ratios and maximum sizes read from config.json equal the 2B defaults
    assert_same_weights(model, tiny_state)


def test_a_diffusers_folder_loads_the_shards_its_index_names_and_refuses_mixed_variants(
    tmp_path: Path, tiny_state: dict[str, Tensor]
) -> None:
    save_diffusers_transformer(tiny_state, tmp_path)
    (weights,) = tmp_path.glob("*.safetensors")
    halved = {name: tensor.half() for name, tensor in load_safetensors(str(weights)).items()}
    save_safetensors(halved, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))  # a second variant
    with pytest.raises(CheckpointError, match=r"\.safetensors: holds .* of another weights file"):
        load_dit(tmp_path)
    index = {"metadata": {}, "weight_map": dict.fromkeys(halved, weights.name)}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_same_weights(load_dit(tmp_path), tiny_state)  # the index names the fp32 file only


def test_loaded_weights_are_not_the_files_pages(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_state, path)
    model = load_dit(path)  # fp32 from fp32 on the CPU: a conversion that copies nothing
    torch.save({name: torch.zeros_like(tensor) for name, tensor in tiny_state.items()}, path)  # rewritten in place
    assert_same_weights(model, tiny_state)


def test_diffusers_config_that_disagrees_is_refused(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    save_diffusers_transformer(tiny_state, tmp_path)
    config_path = tmp_path / "config.json"
    raw = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**raw, "num_attention_heads": 4, "attention_head_dim": 16}))
    with pytest.raises(CheckpointError, match=r"num_attention_heads: weights imply 2, config\.json says 4"):
        load_dit(tmp_path)
    # `checkpoint inspect` lists what loading refuses, and refuses a variant as loading does.
    (problem,) = inspect_checkpoint(tmp_path)["problems"]
    assert "num_attention_heads: weights imply 2, config.json says 4" in problem
    config_path.write_text(json.dumps({**raw, "extra_pos_embed_type": "learnable"}))
    with pytest.raises(CheckpointError, match=r"extra_pos_embed_type: expected None \(Video2World 2B\)"):
        inspect_checkpoint(tmp_path)


def test_a_broken_diffusers_config_or_shard_is_named(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    save_diffusers_transformer(tiny_state, tmp_path)
    config_path = tmp_path / "config.json"
    good = config_path.read_text()
    for broken, expected in (("{bad", "not a readable JSON file"), ("[1, 2]", "expected a JSON object, got a list")):
        config_path.write_text(broken)
        with pytest.raises(CheckpointError, match=f"{config_path}: {expected}"):
            load_dit(tmp_path)
    config_path.write_text(good)
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_dit(tmp_path)


def test_diffusers_names_round_trip() -> None:
    with torch.device("meta"):
        names = list(CosmosDiT(dit_config("predict2-2b")).state_dict())
    diffusers_names = [official_to_diffusers_key(name) for name in names]
    assert "transformer_blocks.27.attn2.to_out.0.weight" in diffusers_names
    assert "time_embed.t_embedder.linear_2.weight" in diffusers_names
    assert len(set(diffusers_names)) == len(names)
    assert [diffusers_to_official_key(name) for name in diffusers_names] == names


@pytest.mark.parametrize("name", sorted(DIT_PRESETS))
def test_infer_config_recovers_each_preset(name: str) -> None:
    config = dit_config(name)
    with torch.device("meta"):  # shapes only: the 2B state dict is never materialised
        state = official_dit_state_dict(CosmosDiT(config))
    assert inferred_config(with_bookkeeping(state)) == config


def test_inconsistent_shapes_are_refused_by_loading_and_listed_by_inspection(tiny_state: dict[str, Tensor]) -> None:
    state = {**tiny_state, "net.blocks.1.mlp.layer1.weight": torch.zeros(128, 64)}
    with pytest.raises(CheckpointError, match=r"net\.blocks\.1\.mlp\.layer1\.weight: expected \[256, 64\], got"):
        dit_from_state_dict(state)
    assert summarize_dit_state_dict(state)["wrong_shapes"] == [
        "net.blocks.1.mlp.layer1.weight: expected [256, 64], got [128, 64]"
    ]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(
    tmp_path: Path, tiny_state: dict[str, Tensor], tiny_inputs: dict[str, Tensor], dtype: torch.dtype
) -> None:
    path = tmp_path / "model.pt"
    torch.save(tiny_state, path)

    model = load_dit(path, dtype=dtype)

    assert {p.dtype for p in model.parameters()} == {dtype}
    assert_same_weights(model, tiny_state)
    if dtype == torch.bfloat16:  # CPU half kernels are partial; bf16 is the precision served
        with torch.inference_mode():
            reference = dit_from_state_dict(tiny_state)(**tiny_inputs)
            output = model(**tiny_inputs)
        assert output.dtype == dtype
        assert (output.float() - reference).abs().max() / reference.abs().max() < 5e-2


def test_unsupported_dtype_is_refused(tiny_state: dict[str, Tensor]) -> None:
    with pytest.raises(ConfigError, match="dtype: expected one of"):
        dit_from_state_dict(tiny_state, dtype=torch.float64)


def test_random_state_dict_is_deterministic() -> None:
    first, again = random_dit_state_dict(TINY, seed=3), random_dit_state_dict(TINY, seed=3)
    other = random_dit_state_dict(TINY, seed=4)
    as_bf16 = random_dit_state_dict(TINY, seed=3, dtype=torch.bfloat16)
    key = "net.blocks.0.self_attn.q_proj.weight"

    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first[key], other[key])
    assert all(torch.equal(as_bf16[k], first[k].to(torch.bfloat16)) for k in first)
    assert abs(first["net.blocks.0.self_attn.q_norm.weight"].mean().item() - 1.0) < 0.1


def test_summary(tiny_state: dict[str, Tensor]) -> None:
    state = with_bookkeeping({k: v.to(torch.bfloat16) for k, v in tiny_state.items()})
    del state["net.blocks.1.mlp.layer2.weight"]
    state["net.blocks.0.cross_attn.q_norm.weight"] = torch.ones(3, dtype=torch.bfloat16)
    state["net.blocks.0.unknown.weight"] = torch.ones(5, dtype=torch.bfloat16)
    state["net.final_layer.linear.weight"][0, 0] = float("nan")

    summary = summarize_dit_state_dict(state)

    assert summary["format"] == "official"
    assert summary["config"] == dataclasses.asdict(TINY)
    head_dim = TINY.model_channels // TINY.num_heads
    assert summary["num_parameters"] == sum(v.numel() for v in tiny_state.values()) - 64 * 256 - head_dim + 3
    assert summary["dtypes"] == {"bfloat16": summary["num_parameters"]}  # elements, as the VAE summary counts
    assert "net.accum_iteration" in summary["ignored_keys"]
    assert "net.blocks.0.self_attn.q_norm._extra_state" in summary["ignored_keys"]
    assert summary["missing_keys"] == ["net.blocks.1.mlp.layer2.weight"]
    assert summary["unexpected_keys"] == ["net.blocks.0.unknown.weight"]  # counted in neither figure above
    assert summary["non_finite"] == ["net.final_layer.linear.weight"]
    assert summary["wrong_shapes"] == [f"net.blocks.0.cross_attn.q_norm.weight: expected [{head_dim}], got [3]"]
    json.dumps(summary)


def test_read_dit_state_dict_reads_diffusers_directories(tmp_path: Path, tiny_state: dict[str, Tensor]) -> None:
    save_diffusers_transformer(tiny_state, tmp_path / "transformer")
    state = read_dit_state_dict(tmp_path)
    assert "transformer_blocks.0.attn1.to_q.weight" in state
    assert summarize_dit_state_dict(state)["format"] == "diffusers"
