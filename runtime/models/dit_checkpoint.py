"""Reading and writing Cosmos-Predict2 DiT checkpoints.

Two formats are read:
  * official: a `.pt` (or `.safetensors`) of flat `net.*` tensors, possibly wrapped once (`checkpoint_io`);
  * diffusers: a `CosmosTransformer3DModel` directory (`config.json` + `*.safetensors`), either the `transformer/`
    folder itself or a pipeline folder holding it.
Both are brought to official parameter names without the `net.` prefix, which are `CosmosDiT`'s own names; the
diffusers renaming is the one table below. Official keys that carry no parameter (Transformer-Engine
`_extra_state`, the `accum_*` training counters, the `pos_embedder.*` RoPE buffers, recomputed at run time) are
ignored; every parameter must be present and nothing else may be.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cosmos_edge.runtime.errors import CheckpointError, ConfigError
from cosmos_edge.runtime.models.checkpoint_io import (
    StateDict,
    elements_per_dtype,
    non_finite_tensors,
    read_json_object,
    read_tensor_file,
)
from cosmos_edge.runtime.models.dit import CosmosDiT
from cosmos_edge.runtime.models.dit_config import MASK_CHANNELS, DiTConfig

OFFICIAL_PREFIX = "net."
LOADABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (official, diffusers) substring replacements, applied in this order by diffusers'
# scripts/convert_cosmos_to_diffusers.py; the reverse mapping applies them backwards with the roles swapped.
_DIFFUSERS_RENAMES: tuple[tuple[str, str], ...] = (
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
)
_DIFFUSERS_ROOTS = ("transformer_blocks.", "patch_embed.", "time_embed.", "norm_out.", "proj_out.")


def official_to_diffusers_key(name: str) -> str:
    """Official parameter name (without `net.`) -> diffusers `CosmosTransformer3DModel` name."""
    for official, diffusers in _DIFFUSERS_RENAMES:
        name = name.replace(official, diffusers)
    return name


def diffusers_to_official_key(name: str) -> str:
    """Diffusers `CosmosTransformer3DModel` name -> official parameter name (without `net.`)."""
    for official, diffusers in reversed(_DIFFUSERS_RENAMES):
        name = name.replace(diffusers, official)
    return name


def _is_ignored(name: str) -> bool:
    return "_extra_state" in name or name.startswith(("accum_", "pos_embedder."))


@dataclass(frozen=True)
class _Canonical:
    """A state dict under official parameter names, with where each name came from."""

    format: str  # "official" or "diffusers"
    params: dict[str, Tensor]
    file_keys: dict[str, str]  # official name -> key in the source
    ignored: list[str]

    def file_key(self, name: str) -> str:
        """The key a parameter has (or would have) in the source's format."""
        if name in self.file_keys:
            return self.file_keys[name]
        return official_to_diffusers_key(name) if self.format == "diffusers" else OFFICIAL_PREFIX + name


def _canonicalize(state_dict: Mapping[str, Tensor]) -> _Canonical:
    fmt = "diffusers" if any(key.startswith(_DIFFUSERS_ROOTS) for key in state_dict) else "official"
    params: dict[str, Tensor] = {}
    file_keys: dict[str, str] = {}
    ignored: list[str] = []
    for key, tensor in state_dict.items():
        name = diffusers_to_official_key(key) if fmt == "diffusers" else key.removeprefix(OFFICIAL_PREFIX)
        if _is_ignored(name):
            ignored.append(key)
            continue
        params[name] = tensor
        file_keys[name] = key
    return _Canonical(fmt, params, file_keys, sorted(ignored))


def _build_on_meta(config: DiTConfig) -> CosmosDiT:
    with torch.device("meta"):
        return CosmosDiT(config)


def _shape_of(canonical: _Canonical, name: str) -> torch.Size:
    if name not in canonical.params:
        raise CheckpointError(f"state dict: expected key {canonical.file_key(name)!r} to infer the DiT size, not found")
    return canonical.params[name].shape


def _block_shape(canonical: _Canonical, num_blocks: int, suffix: str) -> torch.Size:
    """The shape of a block's tensor, read from the first block that holds it: a key missing from block 0 alone is
    then reported as missing, not taken for a file of another network."""
    for index in range(num_blocks):
        if (name := f"blocks.{index}.{suffix}") in canonical.params:
            return canonical.params[name].shape
    return _shape_of(canonical, f"blocks.0.{suffix}")  # refused, naming block 0's key


def _infer_config(canonical: _Canonical, **known: Any) -> DiTConfig:
    """DiT config from tensor shapes, every tensor of that config in its shape; `known` gives fields that shapes
    cannot tell (patch sizes, RoPE, max sizes)."""
    config = _config_from_shapes(canonical, **known)
    if wrong := _wrong_shapes(canonical, config):
        raise CheckpointError(f"state dict: shapes inconsistent with the inferred DiT config: {_listing(wrong)}")
    return config


def _config_from_shapes(canonical: _Canonical, **known: Any) -> DiTConfig:
    patch_temporal = known.get("patch_temporal", DiTConfig.patch_temporal)
    patch_spatial = known.get("patch_spatial", DiTConfig.patch_spatial)
    patch_volume = patch_temporal * patch_spatial**2
    channels, patch_features = _shape_of(canonical, "x_embedder.proj.1.weight")
    out_features = _shape_of(canonical, "final_layer.linear.weight")[0]
    block_ids = {name.split(".")[1] for name in canonical.params if name.startswith("blocks.")}
    num_blocks = len(block_ids)
    if block_ids != {str(i) for i in range(num_blocks)}:
        raise CheckpointError(f"state dict: expected blocks numbered 0..{num_blocks - 1}, got {sorted(block_ids)}")
    head_dim = _block_shape(canonical, num_blocks, "self_attn.q_norm.weight")[0]
    if patch_features % patch_volume or out_features % patch_volume or channels % head_dim:
        raise CheckpointError(
            f"state dict: inconsistent shapes: patch-embed input {patch_features} and output projection "
            f"{out_features} must be multiples of the patch volume {patch_volume}, width {channels} a multiple of "
            f"the head dim {head_dim}"
        )
    try:
        config = DiTConfig(
            **{
                **known,
                "model_channels": channels,
                "num_blocks": num_blocks,
                "num_heads": channels // head_dim,
                "head_dim": head_dim,
                "text_dim": _block_shape(canonical, num_blocks, "cross_attn.k_proj.weight")[1],
                "mlp_hidden": _block_shape(canonical, num_blocks, "mlp.layer1.weight")[0],
                "adaln_lora_dim": _block_shape(canonical, num_blocks, "adaln_modulation_self_attn.1.weight")[0],
                "in_channels": patch_features // patch_volume - MASK_CHANNELS,
                "out_channels": out_features // patch_volume,
            }
        )
    except ConfigError as error:
        raise CheckpointError(f"state dict: shapes give an invalid DiT config: {error}") from error
    return config


def _wrong_shapes(canonical: _Canonical, config: DiTConfig) -> list[str]:
    expected = _build_on_meta(config).state_dict()
    return [
        f"{canonical.file_key(name)}: expected {list(expected[name].shape)}, got {list(tensor.shape)}"
        for name, tensor in canonical.params.items()
        if name in expected and tensor.shape != expected[name].shape
    ]


def _listing(items: Iterable[str], limit: int = 20) -> str:
    items = sorted(items)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_keys(canonical: _Canonical, model: CosmosDiT, source: str) -> None:
    expected = model.state_dict().keys()
    missing = [canonical.file_key(name) for name in expected - canonical.params.keys()]
    unexpected = [canonical.file_key(name) for name in canonical.params.keys() - expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the DiT ({len(expected)} parameters): "
            f"missing [{_listing(missing)}], unexpected [{_listing(unexpected)}]"
        )


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in LOADABLE_DTYPES:
        raise ConfigError(f"dtype: expected one of {[str(d) for d in LOADABLE_DTYPES]}, got {dtype}")


def _materialize(
    canonical: _Canonical, config: DiTConfig, dtype: torch.dtype, device: str | torch.device, source: str
) -> CosmosDiT:
    """Builds the network on meta and assigns the tensors into it; consumes `canonical.params`."""
    model = _build_on_meta(config)
    _check_keys(canonical, model, source)
    # Convert one tensor at a time and drop the source reference, so the 2B network never exists twice. A tensor
    # already of the dtype on the CPU would stay the checkpoint's memory-mapped pages: it is copied, so that a file
    # rewritten (or truncated) while the network is in use cannot change (or crash) it.
    converted = {}
    for name in list(canonical.params):
        stored = canonical.params.pop(name)
        tensor = stored.to(device=device, dtype=dtype)
        converted[name] = tensor.clone() if tensor.data_ptr() == stored.data_ptr() else tensor
    model.load_state_dict(converted, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def dit_from_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rope_bf16_exponents: bool = True,
) -> CosmosDiT:
    """CosmosDiT from an in-memory official or diffusers state dict (config inferred from shapes)."""
    _check_dtype(dtype)
    canonical = _canonicalize(state_dict)
    config = dataclasses.replace(_infer_config(canonical), rope_bf16_exponents=rope_bf16_exponents)
    return _materialize(canonical, config, dtype, device, "state dict")


def _diffusers_transformer_dir(path: Path) -> Path:
    for candidate in (path / "transformer", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(
        f"{path}: expected a diffusers transformer directory (config.json + *.safetensors, directly or under "
        f"transformer/), found no config.json"
    )


def read_dit_state_dict(path: str | Path) -> StateDict:
    """The raw tensors of a checkpoint file or diffusers transformer directory, keys as stored."""
    path = Path(path)
    if not path.is_dir():
        return read_tensor_file(path)
    directory = _diffusers_transformer_dir(path)
    files = _weight_files(directory)
    state: StateDict = {}
    for file in files:  # sharded checkpoints split the keys over several files
        shard = read_tensor_file(file)
        if overlap := sorted(state.keys() & shard.keys()):
            raise CheckpointError(
                f"{file}: holds {overlap[0]} (and {len(overlap) - 1} more keys) of another weights file of "
                f"{directory}; keep one variant there, or its *.safetensors.index.json"
            )
        state.update(shard)
    return state


def _weight_files(directory: Path) -> list[Path]:
    """The weights of a diffusers transformer directory: those its index names when it has one (a folder may also
    hold other variants, such as fp16 shards), else every *.safetensors file."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{indexes[0]}: expected a JSON object with a weight_map ({error})") from None
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]}: names {missing[0]}, which is not in {directory}")
        return [directory / name for name in names]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: expected *.safetensors weights next to config.json, found none")
    return files


def _diffusers_fields(raw: Mapping[str, Any], config_path: Path) -> dict[str, Any]:
    """DiTConfig fields a diffusers config.json gives; refuses variants this network does not have."""
    for field, required in (("concat_padding_mask", True), ("extra_pos_embed_type", None)):
        if raw.get(field, required) != required:
            raise CheckpointError(f"{config_path}: {field}: expected {required!r} (Video2World 2B), got {raw[field]!r}")
    for field in ("use_crossattn_projection", "img_context_dim_in", "controlnet_block_every_n"):
        if raw.get(field):
            raise CheckpointError(f"{config_path}: {field}: expected unset (Video2World 2B), got {raw[field]!r}")
    try:
        patch_t, patch_h, patch_w = raw["patch_size"]
        rope_t, rope_h, rope_w = raw["rope_scale"]
        max_t, max_h, max_w = raw["max_size"]
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{config_path}: expected patch_size, rope_scale and max_size as (t, h, w) lists: {error!r}"
        ) from error
    if patch_h != patch_w:
        raise CheckpointError(f"{config_path}: patch_size: expected equal h and w patches, got {raw['patch_size']}")
    return {
        "patch_temporal": patch_t,
        "patch_spatial": patch_h,
        "rope_t_ratio": float(rope_t),
        "rope_h_ratio": float(rope_h),
        "rope_w_ratio": float(rope_w),
        "max_frames": max_t,
        "max_img_h": max_h,
        "max_img_w": max_w,
    }


def _check_diffusers_json(config: DiTConfig, raw: Mapping[str, Any], path: Path) -> None:
    # diffusers counts the condition-mask channel in in_channels (17 for 2B) and derives the MLP width from a ratio.
    implied = {
        "in_channels": config.in_channels + 1,
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.num_blocks,
        "text_embed_dim": config.text_dim,
        "adaln_lora_dim": config.adaln_lora_dim,
        "mlp_ratio": config.mlp_hidden / config.model_channels,
    }
    wrong = [
        f"{k}: weights imply {v!r}, config.json says {raw[k]!r}" for k, v in implied.items() if k in raw and raw[k] != v
    ]
    if wrong:
        raise CheckpointError(f"{path}: config.json disagrees with the weights: {'; '.join(wrong)}")


def load_dit(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> CosmosDiT:
    """Loads an official checkpoint file or a diffusers directory into an eval-mode CosmosDiT.

    The network is built on the meta device and the checkpoint's tensors are assigned into it one by one
    (converted to `dtype` on `device`), so the 2B weights are held once.
    """
    _check_dtype(dtype)
    canonical, config = _read_checked(Path(path))
    return _materialize(canonical, config, dtype, device, str(path))


def dit_checkpoint_config(path: str | Path) -> DiTConfig:
    """The configuration of a DiT file or diffusers directory, from its tensors' shapes, refused as `load_dit`
    refuses it (an official .pt is memory-mapped: its weights are not read, so a wrong file is named in moments)."""
    return _read_checked(Path(path))[1]


def dit_non_finite_parameters(path: str | Path, dtype: torch.dtype) -> list[str]:
    """The parameters of a DiT file or diffusers directory (official names, sorted) that hold NaN or infinity once
    in `dtype`: one pass over the weights, a tensor at a time, without building the network."""
    params = _read_checked(Path(path))[0].params
    return sorted(name for name, tensor in params.items() if non_finite_tensors({name: tensor.to(dtype)}))


def _read_checked(path: Path) -> tuple[_Canonical, DiTConfig]:
    """The checkpoint's tensors by canonical name and the configuration they (and a diffusers config.json) give."""
    known: dict[str, Any] = {}
    raw_json: dict[str, Any] | None = None
    if path.is_dir():
        config_path = _diffusers_transformer_dir(path) / "config.json"
        raw_json = read_json_object(config_path)
        known = _diffusers_fields(raw_json, config_path)
    state = read_dit_state_dict(path)
    canonical = _canonicalize(state)
    try:
        config = _infer_config(canonical, **known)
    except CheckpointError as error:
        holds_vae = any(key.startswith(("encoder.", "decoder.")) for key in state)
        swapped = " (it holds a Wan2.1 VAE: the tokenizer given for a DiT?)" if holds_vae else ""
        raise CheckpointError(f"{path}: not a Cosmos-Predict2 DiT checkpoint{swapped}: {error}") from error
    del state  # `_materialize` lets each tensor go once copied: nothing else may hold them
    if raw_json is not None:
        _check_diffusers_json(config, raw_json, config_path)
    return canonical, config


def random_dit_state_dict(config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> StateDict:
    """A deterministic random official-format (`net.*`) state dict for tests, benchmarks and the demo.

    Linear weights are N(0, 1/fan_in) so activations stay O(1); the layers producing modulation (the adaLN-LoRA
    term and each modulation MLP's output) are scaled down so that 28 blocks of residual updates stay bounded,
    while still varying enough with the timestep to be tested. RMSNorm scales are 1 + N(0, 0.1^2). Values are
    drawn in float32 and then cast, so every dtype holds the same draw.
    """
    generator = torch.Generator().manual_seed(seed)
    state: StateDict = {}
    for name, param in _build_on_meta(config).named_parameters():
        if param.ndim == 1:  # RMSNorm scale
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            gain = 0.25 if name.endswith((".2.weight", "linear_2.weight")) else 1.0
            value = torch.randn(param.shape, generator=generator) * (gain / param.shape[1] ** 0.5)
        state[OFFICIAL_PREFIX + name] = value.to(dtype)
    return state


def summarize_dit_checkpoint(path: Path) -> dict[str, Any]:
    """`summarize_dit_state_dict` of a checkpoint file or diffusers directory, whose config.json gives what shapes
    cannot tell and is checked as loading checks it: a variant this network is not is refused, a field the weights
    contradict is listed (`config_json_problems`)."""
    if not path.is_dir():
        return summarize_dit_state_dict(read_dit_state_dict(path))
    config_path = _diffusers_transformer_dir(path) / "config.json"
    raw = read_json_object(config_path)
    summary = summarize_dit_state_dict(read_dit_state_dict(path), **_diffusers_fields(raw, config_path))
    try:
        _check_diffusers_json(DiTConfig(**summary["config"]), raw, config_path)
    except CheckpointError as error:
        return summary | {"config_json_problems": [str(error)]}
    return summary | {"config_json_problems": []}


def summarize_dit_state_dict(state_dict: Mapping[str, Tensor], **known: Any) -> dict[str, Any]:
    """A JSON-ready summary for `checkpoint inspect`: format, config, parameter count, dtypes, key problems.
    `known`: config fields that shapes cannot tell (a diffusers config.json's).

    Raises CheckpointError when the shapes do not describe a DiT; a tensor whose shape differs from the one its
    config gives is a problem listed (`wrong_shapes`).
    """
    canonical = _canonicalize(state_dict)
    config = _config_from_shapes(canonical, **known)
    expected = _build_on_meta(config).state_dict().keys()
    present = [name for name in canonical.params if name in expected]
    return {
        "format": canonical.format,
        "config": dataclasses.asdict(config),
        "num_parameters": sum(canonical.params[name].numel() for name in present),
        "dtypes": elements_per_dtype(canonical.params[name] for name in present),  # the same elements as counted
        "ignored_keys": canonical.ignored,
        "missing_keys": sorted(canonical.file_key(name) for name in expected - canonical.params.keys()),
        "unexpected_keys": sorted(canonical.file_key(name) for name in canonical.params.keys() - expected),
        "wrong_shapes": sorted(_wrong_shapes(canonical, config)),
        "non_finite": [canonical.file_key(name) for name in non_finite_tensors(canonical.params)],
    }
