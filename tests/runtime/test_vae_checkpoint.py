from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cosmos_edge.runtime.errors import CheckpointError
from cosmos_edge.runtime.models.checkpoint_inspection import inspect_checkpoint
from cosmos_edge.runtime.models.vae_checkpoint import (
    infer_vae_config,
    load_wan_vae,
    random_vae_state_dict,
    summarize_vae_state_dict,
    to_official_layout,
)
from cosmos_edge.runtime.models.wan_vae import WanVAE, vae_config
from tests.helpers.official_state_dicts import official_vae_state_dict
from tests.helpers.vae_layout import to_diffusers_layout

diffusers_wan = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")
single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")

TINY = vae_config("tiny")


def _meta_official(name: str) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return official_vae_state_dict(WanVAE(vae_config(name)))


def _diffusers_model(name: str) -> torch.nn.Module:
    config = vae_config(name)
    return diffusers_wan.AutoencoderKLWan(
        base_dim=config.base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.dim_mult),
        num_res_blocks=config.num_res_blocks,
        temperal_downsample=list(config.temporal_downsample),
    )


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, torch.Tensor]:
    return random_vae_state_dict(TINY, seed=3)


def _assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("name", ["tiny", "wan2.1"])
def test_infer_config_from_official_layout(name: str) -> None:
    assert infer_vae_config(_meta_official(name)) == vae_config(name)


@pytest.mark.parametrize("name", ["tiny", "wan2.1"])
def test_key_map_matches_diffusers_model_and_converter(name: str) -> None:
    official = _meta_official(name)
    ours = to_diffusers_layout(official, vae_config(name))
    with torch.device("meta"):
        expected_keys = _diffusers_model(name).state_dict().keys()
    assert ours.keys() == expected_keys
    # diffusers' own single-file converter (written for 2 residual blocks, as both presets have) agrees key by key.
    assert single_file_utils.convert_wan_vae_to_diffusers(official).keys() == ours.keys()
    assert all(ours[k] is v for k, v in single_file_utils.convert_wan_vae_to_diffusers(official).items())
    assert to_official_layout(ours).keys() == official.keys()
    assert infer_vae_config(to_official_layout(ours)) == vae_config(name)


def test_official_file_round_trip(tmp_path: Path, tiny_weights: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "tokenizer.pth"
    torch.save(tiny_weights, path)
    model = load_wan_vae(path)
    assert model.config == TINY
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    _assert_same(official_vae_state_dict(model), tiny_weights)


def test_diffusers_directory_round_trip(tmp_path: Path, tiny_weights: dict[str, torch.Tensor]) -> None:
    reference = _diffusers_model("tiny")
    reference.load_state_dict(to_diffusers_layout(tiny_weights, TINY), strict=True)
    reference.save_pretrained(tmp_path / "vae")
    _assert_same(official_vae_state_dict(load_wan_vae(tmp_path / "vae")), tiny_weights)
    _assert_same(official_vae_state_dict(load_wan_vae(tmp_path)), tiny_weights)  # the whole model's folder, too
    transformer = tmp_path / "transformer"
    transformer.mkdir()
    save_file({"x": torch.zeros(2)}, str(transformer / "diffusion_pytorch_model.safetensors"))
    (transformer / "config.json").write_text("{}")
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(transformer))}: not a Wan2.1 VAE \(the tokenizer.pth\): Wan VAE state dict",
    ):
        load_wan_vae(transformer)


def test_diffusers_directory_with_other_latent_statistics_is_refused(
    tmp_path: Path, tiny_weights: dict[str, torch.Tensor]
) -> None:
    save_file(to_diffusers_layout(tiny_weights, TINY), str(tmp_path / "diffusion_pytorch_model.safetensors"))
    config = {"_class_name": "AutoencoderKLWan", "base_dim": 8, "latents_std": [1.0] * 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"latents_std: expected \[2.8184"):
        load_wan_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"base_dim": 96}))
    with pytest.raises(CheckpointError, match=r"base_dim: expected 8, got 96"):
        load_wan_vae(tmp_path)


def test_a_broken_diffusers_config_or_weights_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{bad")
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'config.json'}: not a readable JSON file"):
        load_wan_vae(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=f"{weights}: not a readable safetensors file"):
        load_wan_vae(tmp_path)


def test_directory_without_diffusers_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model.safetensors.*got \['config.json'\]"):
        load_wan_vae(tmp_path)


def test_missing_unexpected_and_misshaped_keys_are_named(tmp_path: Path, tiny_weights: dict[str, torch.Tensor]) -> None:
    broken = dict(tiny_weights)
    del broken["decoder.upsamples.4.shortcut.weight"]
    broken["decoder.upsamples.4.extra"] = torch.zeros(1)
    broken["encoder.middle.1.proj.bias"] = torch.zeros(5)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(CheckpointError) as error:
        load_wan_vae(path)
    message = str(error.value)
    assert "missing keys (1): decoder.upsamples.4.shortcut.weight" in message
    assert "unexpected keys (1): decoder.upsamples.4.extra" in message
    assert "encoder.middle.1.proj.bias: expected [32], got [5]" in message


def test_state_dict_without_the_encoder_stem_is_refused(tiny_weights: dict[str, torch.Tensor]) -> None:
    with pytest.raises(CheckpointError, match=r"'encoder.conv1.weight', it is missing"):
        infer_vae_config({k: v for k, v in tiny_weights.items() if k != "encoder.conv1.weight"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(tmp_path: Path, tiny_weights: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    path = tmp_path / "tokenizer.safetensors"
    save_file(tiny_weights, str(path))
    model = load_wan_vae(path, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.latent_mean.dtype == dtype
    _assert_same(official_vae_state_dict(model), {k: v.to(dtype) for k, v in tiny_weights.items()})
    with torch.inference_mode():
        assert model.encode(torch.zeros(1, 3, 1, 8, 8, dtype=dtype)).dtype == dtype
    # A checkpoint stored in half precision loads as it is.
    torch.save({k: v.to(dtype) for k, v in tiny_weights.items()}, tmp_path / "half.pth")
    assert load_wan_vae(tmp_path / "half.pth", dtype=dtype).conv1.weight.dtype == dtype


def test_random_weights_are_deterministic() -> None:
    first, again, other = (random_vae_state_dict(TINY, seed=s, dtype=torch.bfloat16) for s in (1, 1, 2))
    _assert_same(first, again)
    assert not torch.equal(first["encoder.conv1.weight"], other["encoder.conv1.weight"])
    assert {v.dtype for v in first.values()} == {torch.bfloat16}
    gammas = torch.cat([v.float().flatten() for k, v in first.items() if k.endswith("gamma")])
    assert abs(gammas.mean().item() - 1.0) < 0.05


def test_summary_of_both_layouts(tiny_weights: dict[str, torch.Tensor]) -> None:
    summary = summarize_vae_state_dict(tiny_weights)
    count = sum(v.numel() for v in tiny_weights.values())
    assert summary == {
        "format": "wan",
        "config": {
            "base_dim": 8,
            "z_dim": 16,
            "dim_mult": (1, 2, 4, 4),
            "num_res_blocks": 2,
            "temporal_downsample": (False, True, True),
        },
        "parameters": count,
        "dtypes": {"float32": count},
        "missing_keys": [],
        "unexpected_keys": [],
        "wrong_shapes": [],
    }
    diffusers_summary = summarize_vae_state_dict(to_diffusers_layout(tiny_weights, TINY))
    assert diffusers_summary == {**summary, "format": "diffusers"}


def test_the_summary_of_a_damaged_vae_lists_its_problems(tiny_weights: dict[str, torch.Tensor]) -> None:
    damaged = dict(tiny_weights)
    del damaged["decoder.middle.0.residual.3.gamma"]
    damaged["foo.bar"] = torch.zeros(1)
    damaged["conv1.bias"] = torch.zeros(3)
    summary = summarize_vae_state_dict(damaged)
    assert summary["missing_keys"] == ["decoder.middle.0.residual.3.gamma"]
    assert summary["unexpected_keys"] == ["foo.bar"]
    assert summary["wrong_shapes"] == ["conv1.bias: expected [32], got [3]"]


def test_inspection_names_a_diffusers_vaes_non_finite_tensor_by_its_official_name(
    tmp_path: Path, tiny_weights: dict[str, torch.Tensor]
) -> None:
    damaged = dict(tiny_weights)
    damaged["encoder.conv1.weight"] = damaged["encoder.conv1.weight"].clone()
    damaged["encoder.conv1.weight"].view(-1)[0] = float("nan")
    save_file(to_diffusers_layout(damaged, TINY), str(tmp_path / "vae.safetensors"))
    assert inspect_checkpoint(tmp_path / "vae.safetensors")["problems"] == ["NaN or infinity in encoder.conv1.weight"]
