"""CosmosDiT: parity with diffusers' CosmosTransformer3DModel on the same weights, K/V caching, presets, 2B layout."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.models.dit import CosmosDiT, CrossAttentionKV, VideoRope3D
from cosmos_edge.runtime.models.dit_checkpoint import (
    dit_from_state_dict,
    official_to_diffusers_key,
    random_dit_state_dict,
)
from cosmos_edge.runtime.models.dit_config import DIT_PRESETS, DiTConfig, dit_config
from tests.helpers.official_state_dicts import official_dit_state_dict

transformer_cosmos = pytest.importorskip("diffusers.models.transformers.transformer_cosmos")

TINY = dit_config("tiny")
FRAMES, HEIGHT, WIDTH = 11, 28, 28
NUM_CONDITIONING_FRAMES = 5
TEXT_TOKENS, TEXT_VALID_TOKENS = 512, 12  # T5 pads to 512 tokens with zero vectors
PARITY_TOLERANCE = 1e-5  # max |ours - ref| / max |ref| in float32


def make_inputs(config: DiTConfig, batch: int = 1, seed: int = 0) -> dict[str, Tensor]:
    """Cosmos Policy style inputs: 5 clean conditioning frames (t = 0, mask 1), the rest at t = 0.98."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, FRAMES, HEIGHT, WIDTH, generator=generator)
    timesteps = torch.full((batch, FRAMES), 0.98)
    timesteps[:, :NUM_CONDITIONING_FRAMES] = 0.0
    condition_mask = torch.zeros(batch, 1, FRAMES, HEIGHT, WIDTH)
    condition_mask[:, :, :NUM_CONDITIONING_FRAMES] = 1.0
    text = torch.zeros(batch, TEXT_TOKENS, config.text_dim)
    text[:, :TEXT_VALID_TOKENS] = torch.randn(batch, TEXT_VALID_TOKENS, config.text_dim, generator=generator)
    return {"x": x, "timesteps": timesteps, "condition_mask": condition_mask, "text": text}


def relative_error(ours: Tensor, ref: Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


class _RoundRpowExponentsToBf16(TorchFunctionMode):
    """Rounds the exponent of `float ** tensor` to bf16 before the power.

    diffusers' CosmosRotaryPosEmbed computes `theta ** (arange(0, d, 2) / d)` in float32; the official network
    holds those exponents as buffers that its bf16 cast rounds. This gives diffusers' own RoPE code the official
    exponents without rewriting it.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.Tensor.__rpow__:
            exponent, base = args
            args = (exponent.to(torch.bfloat16).float(), base)
        return func(*args, **(kwargs or {}))


class _Bf16ExponentRope(nn.Module):
    def __init__(self, rope: nn.Module) -> None:
        super().__init__()
        self.rope = rope

    def forward(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        with _RoundRpowExponentsToBf16():
            return self.rope(*args, **kwargs)


def _nearest_resize(image: Tensor, size: list[int], interpolation: str) -> Tensor:
    return F.interpolate(image, size=size, mode=interpolation)


@pytest.fixture
def diffusers_padding_resize(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """diffusers resizes the padding mask with torchvision, which this environment may lack (the mask is zeros)."""
    if not hasattr(transformer_cosmos, "transforms"):
        shim = SimpleNamespace(
            functional=SimpleNamespace(resize=_nearest_resize), InterpolationMode=SimpleNamespace(NEAREST="nearest")
        )
        monkeypatch.setattr(transformer_cosmos, "transforms", shim, raising=False)
    yield


def diffusers_reference(official: dict[str, Tensor], config: DiTConfig) -> nn.Module:
    """diffusers' Video2World 2B transformer at `config`'s sizes, holding the same weights (official -> diffusers)."""
    reference = transformer_cosmos.CosmosTransformer3DModel(
        in_channels=config.in_channels + 1,  # + condition mask; the padding-mask channel is added internally
        out_channels=config.out_channels,
        num_attention_heads=config.num_heads,
        attention_head_dim=config.head_dim,
        num_layers=config.num_blocks,
        mlp_ratio=config.mlp_hidden / config.model_channels,
        text_embed_dim=config.text_dim,
        adaln_lora_dim=config.adaln_lora_dim,
        max_size=(config.max_frames, config.max_img_h, config.max_img_w),
        patch_size=(config.patch_temporal, config.patch_spatial, config.patch_spatial),
        rope_scale=(config.rope_t_ratio, config.rope_h_ratio, config.rope_w_ratio),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    )
    weights = {official_to_diffusers_key(key.removeprefix("net.")): value for key, value in official.items()}
    reference.load_state_dict(weights, strict=True)
    for block in reference.transformer_blocks:
        for attention in (block.attn1, block.attn2):
            # diffusers builds the QK RMSNorms with eps 1e-5; the official TE RMSNorm uses 1e-6.
            attention.norm_q.eps = attention.norm_k.eps = config.norm_eps
    if config.rope_bf16_exponents:
        reference.rope = _Bf16ExponentRope(reference.rope)
    return reference.eval()


def run_diffusers(reference: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    x = inputs["x"]
    batch, _, frames, height, width = x.shape
    return reference(
        hidden_states=x,
        timestep=inputs["timesteps"].view(batch, 1, frames, 1, 1),  # per-frame timesteps
        encoder_hidden_states=inputs["text"],
        condition_mask=inputs["condition_mask"],
        padding_mask=torch.zeros(batch, 1, height, width),
        fps=None,  # fps would scale the temporal RoPE positions; the checkpoints were trained without that
        return_dict=False,
    )[0]


@pytest.fixture(scope="module")
def tiny_official() -> dict[str, Tensor]:
    return random_dit_state_dict(TINY, seed=1)


@pytest.mark.parametrize("bf16_exponents", [True, False], ids=["bf16-exponents", "exact-exponents"])
@torch.inference_mode()
def test_matches_diffusers(
    tiny_official: dict[str, Tensor], bf16_exponents: bool, diffusers_padding_resize: None
) -> None:
    config = dataclasses.replace(TINY, rope_bf16_exponents=bf16_exponents)
    ours = dit_from_state_dict(tiny_official, rope_bf16_exponents=bf16_exponents)
    inputs = make_inputs(config)

    expected = run_diffusers(diffusers_reference(tiny_official, config), inputs)
    got = ours(**inputs)

    assert got.shape == (1, 16, FRAMES, HEIGHT, WIDTH)
    assert relative_error(got, expected) <= PARITY_TOLERANCE
    # The tiny preset's RoPE split (12/10/10) is one where the exponent rounding shows at this tolerance.
    other = dit_from_state_dict(tiny_official, rope_bf16_exponents=not bf16_exponents)
    assert relative_error(other(**inputs), expected) > PARITY_TOLERANCE


@torch.inference_mode()
def test_rope_tables_match_diffusers() -> None:
    config = dit_config("predict2-2b")  # head dim 128: t/h/w = 44/42/42
    grid = (FRAMES, HEIGHT // 2, WIDTH // 2)
    diffusers_rope = transformer_cosmos.CosmosRotaryPosEmbed(
        hidden_size=config.head_dim, max_size=(128, 240, 240), patch_size=(1, 2, 2), rope_scale=(1.0, 3.0, 3.0)
    )
    probe = torch.zeros(1, 1, FRAMES, HEIGHT, WIDTH)
    exact_cos, exact_sin = diffusers_rope(probe)
    rounded_cos, rounded_sin = _Bf16ExponentRope(diffusers_rope)(probe)

    for bf16_exponents, cos, sin in ((False, exact_cos, exact_sin), (True, rounded_cos, rounded_sin)):
        rope = VideoRope3D(dataclasses.replace(config, rope_bf16_exponents=bf16_exponents))
        our_cos, our_sin = rope(grid, torch.device("cpu"))
        torch.testing.assert_close(our_cos[0, 0], cos, rtol=0, atol=1e-6)
        torch.testing.assert_close(our_sin[0, 0], sin, rtol=0, atol=1e-6)
    # The rounding is not a no-op: high-frequency pairs move by far more than float32 noise.
    assert (exact_cos - rounded_cos).abs().max() > 1e-3


def test_rope_tables_are_cached_per_grid() -> None:
    rope = VideoRope3D(TINY)
    cpu = torch.device("cpu")
    first = rope((11, 14, 14), cpu)
    assert rope((11, 14, 14), cpu) is first
    assert rope((9, 14, 14), cpu)[0].shape == (1, 1, 9 * 14 * 14, TINY.head_dim)


def test_rope_tables_cached_in_inference_mode_serve_autograd() -> None:
    model = CosmosDiT(TINY)
    inputs = {**make_inputs(TINY), "text": torch.randn(1, 4, TINY.text_dim)}
    with torch.inference_mode():
        model(**inputs)  # fills the RoPE cache
    model(**inputs).square().mean().backward()  # e.g. tracing or fine-tuning after a served call
    assert model.blocks[0].self_attn.q_proj.weight.grad is not None


@torch.inference_mode()
def test_precomputed_text_kv_matches_raw_text(tiny_official: dict[str, Tensor]) -> None:
    model = dit_from_state_dict(tiny_official)
    inputs = make_inputs(TINY, batch=2)
    inputs["text"] = inputs["text"][:1].expand(2, -1, -1)  # one instruction for the whole batch
    text_kv = model.precompute_text_kv(inputs["text"][:1])

    assert isinstance(text_kv, CrossAttentionKV)
    assert text_kv.k.shape == (TINY.num_blocks, 1, TINY.num_heads, TEXT_TOKENS, TINY.head_dim)
    torch.testing.assert_close(model(**{**inputs, "text": text_kv}), model(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_precomputed_modulation_gives_the_bits_of_the_timesteps(
    tiny_official: dict[str, Tensor], dtype: torch.dtype
) -> None:
    model = dit_from_state_dict(tiny_official, dtype=dtype)
    inputs = make_inputs(TINY, batch=2)
    inputs["timesteps"][1, NUM_CONDITIONING_FRAMES:] = 0.5
    modulation = model.precompute_modulation(inputs["timesteps"])

    channels = TINY.model_channels
    assert modulation.blocks.shape == (TINY.num_blocks, 9, 2, FRAMES, 1, channels)
    assert modulation.final.shape == (2, 2, FRAMES, 1, channels)
    torch.testing.assert_close(model(**{**inputs, "timesteps": modulation}), model(**inputs), rtol=0, atol=0)
    one_sample = {name: value[:1] for name, value in inputs.items()}
    with pytest.raises(
        InputError, match=re.escape(f"timesteps: expected a modulation of blocks [{TINY.num_blocks}, 9, 1,")
    ):
        model(**{**one_sample, "timesteps": modulation})
    other = dit_from_state_dict(random_dit_state_dict(dataclasses.replace(TINY, num_blocks=TINY.num_blocks + 1), 1))
    with pytest.raises(InputError, match="timesteps: expected a modulation of blocks"):
        other(**{**inputs, "timesteps": modulation})  # one block short for it


@torch.inference_mode()
def test_batch_is_independent(tiny_official: dict[str, Tensor]) -> None:
    model = dit_from_state_dict(tiny_official)
    inputs = make_inputs(TINY, batch=2, seed=3)
    inputs["timesteps"][1, NUM_CONDITIONING_FRAMES:] = 0.5
    batched = model(**inputs)
    for index in range(2):
        single = model(**{name: value[index : index + 1] for name, value in inputs.items()})
        torch.testing.assert_close(batched[index : index + 1], single, rtol=1e-5, atol=1e-6)


def test_timesteps_are_per_frame(tiny_official: dict[str, Tensor]) -> None:
    model = dit_from_state_dict(tiny_official)
    inputs = make_inputs(TINY)
    changed = {**inputs, "timesteps": inputs["timesteps"].clone()}
    changed["timesteps"][0, -1] = 0.5
    with torch.inference_mode():
        before, after = model(**inputs), model(**changed)
    # The last frame's modulation changed; attention spreads that to other frames only weakly.
    assert relative_error(after[:, :, -1], before[:, :, -1]) > 1e-2


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("x", torch.zeros(1, 17, FRAMES, HEIGHT, WIDTH), "x: expected shape [B, 16, T, H, W]"),
        ("x", torch.zeros(1, 16, FRAMES, 27, WIDTH), "H, W by 2"),
        ("timesteps", torch.zeros(1), "timesteps: expected shape [1, 11]"),
        ("condition_mask", torch.zeros(1, 1, FRAMES, HEIGHT), "condition_mask: expected shape"),
        ("text", torch.zeros(1, 4, 31), "text: expected shape [B, L, 32]"),
    ],
)
def test_malformed_inputs_are_named(name: str, value: Tensor, message: str) -> None:
    inputs = {**make_inputs(TINY), name: value}
    with pytest.raises(InputError, match=re.escape(message)):
        CosmosDiT(TINY)(**inputs)


def test_input_larger_than_rope_range_is_refused() -> None:
    model = CosmosDiT(dataclasses.replace(TINY, max_frames=8))
    with pytest.raises(InputError, match="patch grid"):
        model(**make_inputs(model.config))


def _reference_2b_shapes() -> dict[str, tuple[int, ...]]:
    """Official 2B keys and shapes as listed in the reference (section 1.4), without buffers and counters."""
    width, heads_dim, text, mlp, lora = 2048, 128, 1024, 8192, 256
    shapes = {
        "x_embedder.proj.1.weight": (width, 72),
        "t_embedder.1.linear_1.weight": (width, width),
        "t_embedder.1.linear_2.weight": (3 * width, width),
        "t_embedding_norm.weight": (width,),
        "final_layer.adaln_modulation.1.weight": (lora, width),
        "final_layer.adaln_modulation.2.weight": (2 * width, lora),
        "final_layer.linear.weight": (64, width),
    }
    for i in range(28):
        block = f"blocks.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes[f"{block}self_attn.{proj}.weight"] = (width, width)
        for proj, shape in (("q_proj", (width, width)), ("k_proj", (width, text)), ("v_proj", (width, text))):
            shapes[f"{block}cross_attn.{proj}.weight"] = shape
        shapes[f"{block}cross_attn.output_proj.weight"] = (width, width)
        for attention in ("self_attn", "cross_attn"):
            shapes[f"{block}{attention}.q_norm.weight"] = (heads_dim,)
            shapes[f"{block}{attention}.k_norm.weight"] = (heads_dim,)
        shapes[f"{block}mlp.layer1.weight"] = (mlp, width)
        shapes[f"{block}mlp.layer2.weight"] = (width, mlp)
        for part in ("self_attn", "cross_attn", "mlp"):
            shapes[f"{block}adaln_modulation_{part}.1.weight"] = (lora, width)
            shapes[f"{block}adaln_modulation_{part}.2.weight"] = (3 * width, lora)
    return {"net." + key: shape for key, shape in shapes.items()}


def test_predict2_2b_has_the_official_layout() -> None:
    with torch.device("meta"):
        model = CosmosDiT(dit_config("predict2-2b"))
    shapes = {key: tuple(value.shape) for key, value in official_dit_state_dict(model).items()}

    assert shapes == _reference_2b_shapes()
    num_parameters = sum(p.numel() for p in model.parameters())
    assert abs(num_parameters - 1.956e9) < 1e6


def test_presets_by_exact_name() -> None:
    assert set(DIT_PRESETS) == {"predict2-2b", "small", "tiny"}
    assert dit_config("predict2-2b").rope_dims == (44, 42, 42)
    assert dit_config("predict2-2b").patch_in_features == 72
    with pytest.raises(ConfigError, match=r"expected one of \['predict2-2b', 'small', 'tiny'\], got '2b'"):
        dit_config("2b")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_channels": 96}, "model_channels: expected num_heads \\* head_dim"),
        ({"head_dim": 10, "model_channels": 20}, "head_dim: expected an even number >= 12"),
        ({"num_blocks": 0}, "num_blocks: expected a positive int, got 0"),
        ({"rope_h_ratio": -1.0}, "rope_h_ratio: expected a positive number"),
        ({"max_img_h": 241}, "max_img_h: expected a multiple of the patch size 2"),
    ],
)
def test_config_validation_names_the_field(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(TINY, **change)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_gives_the_separate_projections_output_without_more_memory(dtype: torch.dtype) -> None:
    config = dit_config("tiny")
    separate = dit_from_state_dict(random_dit_state_dict(config, 5), dtype=dtype)
    fused = dit_from_state_dict(random_dit_state_dict(config, 5), dtype=dtype)
    before = {name: tensor.data_ptr() for name, tensor in fused.state_dict().items()}
    fused.fuse_qkv()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((2, 16, 11, 28, 28), generator=generator)
    timesteps = torch.full((2, 11), 0.5)
    mask = torch.zeros(2, 1, 11, 28, 28)
    text = torch.randn((1, 8, config.text_dim), generator=generator)
    with torch.no_grad():
        expected, got = separate(x, timesteps, mask, text), fused(x, timesteps, mask, text)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()  # measured bit-identical on this CPU
    block = fused.blocks[0].self_attn
    assert block.q_proj.weight.data_ptr() == block.qkv_weight.data_ptr()  # the official weights are views of it
    assert set(fused.state_dict()) == set(before)  # the official key set, unchanged
