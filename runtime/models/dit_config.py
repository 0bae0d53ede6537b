"""Shape and numerics configuration of the Cosmos-Predict2 DiT (official `MinimalV1LVGDiT`), with named presets.

Field names follow the official network's constructor where one exists (`model_channels`, `num_blocks`,
`adaln_lora_dim`, `patch_spatial`, ...). Every preset keeps every structure of the 2B network (adaLN-LoRA,
QK-norm, cross-attention, 3D RoPE); only the sizes change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cosmos_edge.runtime.checks import is_positive_int
from cosmos_edge.runtime.errors import ConfigError

# Channels the network concatenates to the latent before the patch embed: condition mask + padding mask.
MASK_CHANNELS = 2


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of a Cosmos-Predict2 Video2World DiT.

    Args:
        model_channels: hidden width D (2048 for 2B); must equal num_heads * head_dim.
        num_blocks: number of transformer blocks.
        num_heads: attention heads.
        head_dim: channels per head; split for RoPE as t / h / w = head_dim - 2*(head_dim//6*2), head_dim//6*2, ...
        text_dim: width of the text embeddings (T5-XXL: 1024).
        mlp_hidden: hidden width of the GELU MLP (4 * D in every released model).
        adaln_lora_dim: bottleneck of the adaLN-LoRA modulation MLPs.
        in_channels / out_channels: latent channels (Wan VAE: 16); two mask channels are added to the input.
        patch_spatial / patch_temporal: patch size (h = w, t).
        max_img_h / max_img_w / max_frames: largest latent input the RoPE tables cover.
        rope_h_ratio / rope_w_ratio / rope_t_ratio: NTK extrapolation ratios of the RoPE axes.
        rope_bf16_exponents: round the per-axis RoPE exponents arange(0, d, 2) / d to bfloat16, as the official
            inference does (it casts the whole network, buffers included, to bf16). False gives exact exponents.
        norm_eps: epsilon of every LayerNorm and RMSNorm.
    """

    model_channels: int
    num_blocks: int
    num_heads: int
    head_dim: int
    text_dim: int
    mlp_hidden: int
    adaln_lora_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch_spatial: int = 2
    patch_temporal: int = 1
    max_img_h: int = 240
    max_img_w: int = 240
    max_frames: int = 128
    rope_h_ratio: float = 3.0
    rope_w_ratio: float = 3.0
    rope_t_ratio: float = 1.0
    rope_bf16_exponents: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in (
            "model_channels",
            "num_blocks",
            "num_heads",
            "head_dim",
            "text_dim",
            "mlp_hidden",
            "adaln_lora_dim",
            "in_channels",
            "out_channels",
            "patch_spatial",
            "patch_temporal",
            "max_img_h",
            "max_img_w",
            "max_frames",
        ):
            value = getattr(self, name)
            if not is_positive_int(value):
                raise ConfigError(f"DiTConfig.{name}: expected a positive int, got {value!r}")
        for name in ("rope_h_ratio", "rope_w_ratio", "rope_t_ratio", "norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ConfigError(f"DiTConfig.{name}: expected a positive number, got {value!r}")
        if self.model_channels != self.num_heads * self.head_dim:
            raise ConfigError(
                f"DiTConfig.model_channels: expected num_heads * head_dim = {self.num_heads} * {self.head_dim} "
                f"= {self.num_heads * self.head_dim}, got {self.model_channels}"
            )
        # NTK scaling divides by (axis_dim - 2), so each RoPE axis needs at least 4 channels.
        if self.head_dim % 2 or self.head_dim < 12:
            raise ConfigError(f"DiTConfig.head_dim: expected an even number >= 12 (3D RoPE), got {self.head_dim}")
        for name, size, patch in (
            ("max_img_h", self.max_img_h, self.patch_spatial),
            ("max_img_w", self.max_img_w, self.patch_spatial),
            ("max_frames", self.max_frames, self.patch_temporal),
        ):
            if size % patch:
                raise ConfigError(f"DiTConfig.{name}: expected a multiple of the patch size {patch}, got {size}")

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Head channels given to the (t, h, w) RoPE axes: 44 / 42 / 42 for head_dim 128."""
        dim_h = self.head_dim // 6 * 2
        return self.head_dim - 2 * dim_h, dim_h, dim_h

    @property
    def patch_in_features(self) -> int:
        """Input width of the patch-embed linear: (latent + mask channels) * patch volume (72 for 2B)."""
        return (self.in_channels + MASK_CHANNELS) * self.patch_temporal * self.patch_spatial**2

    @property
    def patch_out_features(self) -> int:
        """Output width of the final linear: out_channels * patch volume (64 for 2B)."""
        return self.out_channels * self.patch_temporal * self.patch_spatial**2

    @property
    def max_patch_grid(self) -> tuple[int, int, int]:
        """Largest (T, H, W) patch grid the network accepts (128, 120, 120 for 2B)."""
        return (
            self.max_frames // self.patch_temporal,
            self.max_img_h // self.patch_spatial,
            self.max_img_w // self.patch_spatial,
        )

    def text_kv_shape(self, text_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of one instruction's cross-attention keys (or values), every block: "n 1 heads l head_dim"."""
        return (self.num_blocks, 1, self.num_heads, text_tokens, self.head_dim)


DIT_PRESETS: Mapping[str, DiTConfig] = MappingProxyType(
    {
        # Cosmos-Predict2-2B Video2World, the backbone of every released Cosmos Policy checkpoint.
        "predict2-2b": DiTConfig(
            model_channels=2048,
            num_blocks=28,
            num_heads=16,
            head_dim=128,
            text_dim=1024,
            mlp_hidden=8192,
            adaln_lora_dim=256,
        ),
        # CPU benchmarks: the 2B structure at a width where an 11-frame 28x28 forward takes ~0.5 s on 2 cores.
        "small": DiTConfig(
            model_channels=512,
            num_blocks=4,
            num_heads=8,
            head_dim=64,
            text_dim=1024,
            mlp_hidden=2048,
            adaln_lora_dim=64,
        ),
        # Unit tests: an 11-frame 28x28 forward takes ~40 ms on 2 cores. Head dim 32 splits RoPE 12/10/10, where
        # (unlike 16 -> 8/4/4) the bf16 rounding of the exponents changes the tables, so parity tests can see it.
        "tiny": DiTConfig(
            model_channels=64,
            num_blocks=2,
            num_heads=2,
            head_dim=32,
            text_dim=32,
            mlp_hidden=256,
            adaln_lora_dim=16,
        ),
    }
)


def dit_config(name: str) -> DiTConfig:
    """Returns the preset called exactly `name` (see `DIT_PRESETS`)."""
    try:
        return DIT_PRESETS[name]
    except KeyError:
        raise ConfigError(f"DiT preset: expected one of {sorted(DIT_PRESETS)}, got {name!r}") from None
