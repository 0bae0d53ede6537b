"""Wan2.1 VAE checkpoints: the official `tokenizer.pth` layout, diffusers' `AutoencoderKLWan` layout, random weights.

`WanVAE`'s own state dict is the official layout, so official checkpoints load as they are; diffusers keys are
renamed to it. The configuration is always read from the tensor shapes, never from a file name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from cosmos_edge.runtime.errors import CheckpointError, ConfigError
from cosmos_edge.runtime.models.checkpoint_io import (
    StateDict,
    elements_per_dtype,
    read_json_object,
    read_tensor_file,
)
from cosmos_edge.runtime.models.wan_vae import LATENT_MEAN, LATENT_STD, WanVAE, WanVAEConfig

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# (official, diffusers) prefixes of the top-level 1x1x1 convs, of the encoder/decoder stems and heads, and of the
# layers inside a residual block.
_TOP_RENAMES = (("conv1.", "quant_conv."), ("conv2.", "post_quant_conv."))
_SIDE_RENAMES = (("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."))
_RESNET_RENAMES = (
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
)
# Official middle.{i} -> diffusers mid_block.{...}.
_MIDDLE = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
_MIDDLE_INVERSE = {v: k for k, v in _MIDDLE.items()}


def _to_official(key: str, renames: tuple[tuple[str, str], ...]) -> str | None:
    """`key` with the first diffusers prefix of `renames` it starts with swapped for the official one; None if none."""
    for official, diffusers in renames:
        if key.startswith(diffusers):
            return official + key[len(diffusers) :]
    return None


def _diffusers_to_official_key(key: str, num_res_blocks: int) -> str:
    top = _to_official(key, _TOP_RENAMES)
    if top is not None:
        return top
    side, _, rest = key.partition(".")
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        block, leaf = f"downsamples.{match[1]}.", match[2]
    elif match := re.fullmatch(r"up_blocks\.(\d+)\.(?:resnets\.(\d+)|upsamplers\.0)\.(.+)", rest):
        position = int(match[2]) if match[2] is not None else num_res_blocks + 1
        block, leaf = f"upsamples.{int(match[1]) * (num_res_blocks + 2) + position}.", match[3]
    elif (match := re.fullmatch(r"mid_block\.(\w+\.\d+)\.(.+)", rest)) and match[1] in _MIDDLE_INVERSE:
        block, leaf = f"middle.{_MIDDLE_INVERSE[match[1]]}.", match[2]
    else:
        renamed = _to_official(rest, _SIDE_RENAMES)
        return key if renamed is None else f"{side}.{renamed}"
    return f"{side}.{block}{_to_official(leaf, _RESNET_RENAMES) or leaf}"


def _holds_dit(state_dict: Mapping[str, torch.Tensor]) -> bool:
    # The DiT's patch embedding: `x_embedder` in the official layout, `patch_embed` in diffusers'.
    return any(part in key for key in state_dict for part in ("x_embedder.", "patch_embed."))


def _is_diffusers_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.conv_in.weight" in state_dict


def to_official_layout(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Returns the state dict in the official Wan layout, renaming diffusers keys if it is in that layout.

    Keys that match no rule keep their name, so the key check of `infer_vae_config` reports them.
    """
    if not _is_diffusers_layout(state_dict):
        return dict(state_dict)
    resnets = {k.split(".")[4] for k in state_dict if k.startswith("decoder.up_blocks.0.resnets.")}
    if not resnets:
        raise CheckpointError("diffusers VAE: expected keys decoder.up_blocks.0.resnets.*, got none")
    num_res_blocks = len(resnets) - 1
    return {_diffusers_to_official_key(k, num_res_blocks): v for k, v in state_dict.items()}


def _expected_shapes(config: WanVAEConfig) -> dict[str, torch.Size]:
    """Official key -> tensor shape of a `WanVAE` with `config` (built on the meta device: no memory, no init)."""
    with torch.device("meta"):
        model = WanVAE(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state_dict:
        raise CheckpointError(f"Wan VAE state dict: expected key {key!r}, it is missing")
    return state_dict[key].shape


def infer_vae_config(state_dict: Mapping[str, torch.Tensor]) -> WanVAEConfig:
    """Reads the configuration of an official-layout state dict from its shapes, then checks every key and shape.

    Raises CheckpointError naming missing keys, unexpected keys and mismatched shapes.
    """
    config = _vae_structure(state_dict)
    problems = [
        f"{label} ({len(items)}): {', '.join(items)}"
        for label, items in zip(
            ("missing keys", "unexpected keys", "shapes"), _key_problems(config, state_dict), strict=True
        )
        if items
    ]
    if problems:
        raise CheckpointError(f"Wan VAE state dict does not match the inferred config {config}; " + "; ".join(problems))
    return config


def _vae_structure(state_dict: Mapping[str, torch.Tensor]) -> WanVAEConfig:
    """The configuration the shapes of a few tensors of an official-layout state dict describe."""
    base_dim = _shape(state_dict, "encoder.conv1.weight")[0]
    z_dim = _shape(state_dict, "conv2.weight")[0]
    # The encoder is a flat list: num_res_blocks residual blocks per stage, a downsample after all stages but the last.
    downsamples = sorted(
        int(match[1])
        for k in state_dict
        if (match := re.fullmatch(r"encoder\.downsamples\.(\d+)\.resample\.1\.weight", k))
    )
    if not downsamples:
        raise CheckpointError("Wan VAE state dict: expected keys encoder.downsamples.{i}.resample.1.weight, got none")
    stage_dims = [_shape(state_dict, f"encoder.downsamples.{i}.resample.1.weight")[0] for i in downsamples]
    stage_dims.append(_shape(state_dict, "encoder.head.0.gamma")[0])
    if any(dim % base_dim for dim in stage_dims):
        raise CheckpointError(
            f"Wan VAE encoder: expected stage widths that are multiples of {base_dim}, got {stage_dims}"
        )
    try:
        config = WanVAEConfig(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=tuple(dim // base_dim for dim in stage_dims),
            num_res_blocks=downsamples[0],
            temporal_downsample=tuple(f"encoder.downsamples.{i}.time_conv.weight" in state_dict for i in downsamples),
        )
    except ConfigError as error:
        raise CheckpointError(f"Wan VAE state dict describes an unsupported network: {error}") from error
    return config


def _key_problems(
    config: WanVAEConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """The keys of a `config` VAE that `state_dict` lacks, the keys it has beyond them, and its wrongly shaped
    tensors ("key: expected [...], got [...]")."""
    expected = _expected_shapes(config)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: expected {list(shape)}, got {list(state_dict[k].shape)}"
        for k, shape in expected.items()
        if k in state_dict and state_dict[k].shape != shape
    ]
    return missing, unexpected, mismatched


def random_vae_state_dict(config: WanVAEConfig, seed: int, dtype: torch.dtype = torch.float32) -> StateDict:
    """Deterministic random weights in the official layout that keep activations O(1) (tests, demos).

    Conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), RMS gammas ~ 1 + N(0, 0.1^2). The decoder's output conv is
    scaled down so decoded pixels mostly stay inside [-1, 1] and the clamp does not hide differences.
    """
    generator = torch.Generator().manual_seed(seed)
    weights: StateDict = {}
    for key, shape in _expected_shapes(config).items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith(".gamma"):
            value = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            value = 0.02 * noise
        else:
            gain = 0.5 if key == "decoder.head.2.weight" else 1.0
            value = noise * (gain / math.sqrt(math.prod(shape[1:])))
        weights[key] = value.to(dtype)
    return weights


def summarize_vae_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Layout, configuration, parameter count, elements per dtype, and the missing, unexpected and wrongly shaped
    tensors against the configuration its shapes describe, for `cosmos-edge checkpoint inspect`."""
    official = to_official_layout(state_dict)
    config = _vae_structure(official)
    missing, unexpected, mismatched = _key_problems(config, official)
    elements = elements_per_dtype(state_dict.values())
    return {
        "format": "diffusers" if _is_diffusers_layout(state_dict) else "wan",
        "config": asdict(config),
        "parameters": sum(elements.values()),
        "dtypes": elements,
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "wrong_shapes": mismatched,
    }


def load_wan_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> WanVAE:
    """Loads an official `tokenizer.pth` (or any tensor file in either layout) or a diffusers `vae/` directory.

    Returns the model in eval mode without gradients, in `dtype` on `device`.
    """
    path = Path(path)
    if path.is_dir():
        state_dict, config = _read_diffusers_dir(path)
    else:
        state_dict = to_official_layout(read_tensor_file(path))
        config = _named_vae_config(path, state_dict)
    with torch.device(device):
        model = WanVAE(config)
    model.to(dtype)
    model.load_state_dict(state_dict)  # keys and shapes already checked; copies cast to `dtype`
    return model.eval().requires_grad_(False)


def _named_vae_config(path: Path, state_dict: StateDict) -> WanVAEConfig:
    """`infer_vae_config`, its error naming `path` (and a DiT given in the VAE's place)."""
    try:
        return infer_vae_config(state_dict)
    except CheckpointError as error:
        swapped = " (it holds a Cosmos DiT: the policy checkpoint given as the VAE?)" if _holds_dit(state_dict) else ""
        raise CheckpointError(f"{path}: not a Wan2.1 VAE (the tokenizer.pth){swapped}: {error}") from error


def _read_diffusers_dir(path: Path) -> tuple[StateDict, WanVAEConfig]:
    """The official-layout state dict of a diffusers VAE folder (or of the model folder holding it), and its config
    (checked against the folder's config.json)."""
    if (path / "vae").is_dir():  # a whole diffusers model, as `--checkpoint` takes one: its VAE
        path = path / "vae"
    config_path, weights_path = path / DIFFUSERS_CONFIG, path / DIFFUSERS_WEIGHTS
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{path}: expected a diffusers AutoencoderKLWan folder with {DIFFUSERS_CONFIG} and {DIFFUSERS_WEIGHTS} "
            f"(the `vae/` subfolder of a diffusers model), got {sorted(p.name for p in path.iterdir())}"
        )
    config = read_json_object(config_path)
    state_dict = to_official_layout(read_tensor_file(weights_path))
    vae_config = _named_vae_config(path, state_dict)
    inferred = asdict(vae_config)
    # Config fields that the weights cannot show, or that the weights must agree with.
    expected = {
        "_class_name": "AutoencoderKLWan",
        "is_residual": False,
        "patch_size": None,
        "base_dim": inferred["base_dim"],
        "z_dim": inferred["z_dim"],
        "dim_mult": list(inferred["dim_mult"]),
        "num_res_blocks": inferred["num_res_blocks"],
        "temperal_downsample": list(inferred["temporal_downsample"]),
        "attn_scales": [],
        "latents_mean": list(LATENT_MEAN),
        "latents_std": list(LATENT_STD),
    }
    wrong = [
        f"{field}: expected {value!r}, got {config[field]!r}"
        for field, value in expected.items()
        if field in config and config[field] != value
    ]
    if config.get("decoder_base_dim") not in (None, inferred["base_dim"]):
        wrong.append(f"decoder_base_dim: expected None or {inferred['base_dim']}, got {config['decoder_base_dim']!r}")
    if wrong:
        raise CheckpointError(f"{config_path}: not the Wan2.1 VAE these weights describe; " + "; ".join(wrong))
    return state_dict, vae_config
