"""The Wan2.1 video VAE (Cosmos Policy's tokenizer), computed statically over the whole clip.

The official code (Wan `WanVAE_`, diffusers `AutoencoderKLWan`) encodes frame 0 alone and then 4-frame chunks, and
decodes one latent frame at a time, carrying a 2-frame feature cache per causal conv between calls. That cache only
ever holds the frames a causal conv would see in the whole clip, so the same numbers come from running every layer
once over all frames with zero past-padding. Two layers need care, both at the first frame:

- the stride-2 temporal downsample never convolves chunk 0 (frame 0 passes through), and each later window starts
  on the previous chunk's last frame: windows (0,1,2), (2,3,4), ... over the clip, without padding;
- the frame-doubling temporal upsample skips chunk 0 (the 'Rep' cache entry) and starts the causal conv afresh with
  zero padding on frame 1.

No Python loop over time and no cache: the graph is static, which is what ONNX/TensorRT export needs. Branches
depend on shapes only. Module attributes mirror the official checkpoint keys, so `state_dict()` is the Wan layout.

The one cache kept on purpose is `CausalContext`: every Cosmos Policy clip starts with the same black frames, so their
causal state is computed once (`WanVAE.encode_prefix`) and each query encodes only the frames after them
(`WanVAE.encode_continuation`). That is the official chunked encoder's feature cache, taken at a chunk boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosmos_edge.runtime.checks import is_positive_int
from cosmos_edge.runtime.errors import ConfigError, InputError

# Per-channel statistics of the Wan2.1 latent space (hard-coded in Cosmos Policy's `CosmosPolicyWanVAE` and in
# diffusers' `AutoencoderKLWan` defaults): z = (mu - mean) / std.
LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# The official encoder feeds frame 0, then windows of this many frames; clips must be 1 + 4k frames long.
TEMPORAL_WINDOW = 4


class CausalContext:
    """What each causal layer of the encoder saw last in a clip, so that the frames after it encode on their own.

    Recorded by `WanVAE.encode_prefix`: a causal conv keeps the last `past_frames` frames of its input, a temporal
    downsample the last frame entering its time conv. Used by `WanVAE.encode_continuation`: the convs pad with those
    frames instead of zeros, and each temporal downsample starts its first window on the kept frame, exactly the
    windows the whole clip would have. Batch 1; a continuation of batch b broadcasts it.

    With `fold`, it also holds the convs' weights folded for `CausalConv3d.conv_frames`, and continuations run those
    convs that way: the same sums in another order, which cuDNN runs faster once compiled (on an H200, 9.8 against
    13.0 ms for ALOHA's 12 camera frames), and slower eager. Like the kept frames, the folded weights belong to the
    weights the context was recorded with.
    """

    def __init__(self) -> None:
        self.recording = True
        self._frames: dict[nn.Module, Tensor] = {}
        self._folded_weights: dict[nn.Module, Tensor] = {}

    def keep(self, layer: nn.Module, frames: Tensor) -> None:
        self._frames[layer] = frames[:1].detach().clone()

    def past(self, layer: nn.Module, batch: int) -> Tensor:
        return self._frames[layer].expand(batch, -1, -1, -1, -1)

    def fold(self, layers: list[CausalConv3d]) -> None:
        self._folded_weights = {layer: layer.folded_weight() for layer in layers}

    def folded_weight(self, layer: nn.Module) -> Tensor | None:
        return self._folded_weights.get(layer)


def _apply(layer: nn.Module, x: Tensor, context: CausalContext | None) -> Tensor:
    """Runs one layer of an encoder stack, handing the causal context to the layers that use one."""
    return layer(x, context) if isinstance(layer, CausalConv3d | ResidualBlock | Downsample) else layer(x)


def _require(ok: bool, field: str, expected: str, got: object) -> None:
    if not ok:
        raise ConfigError(f"WanVAEConfig.{field}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class WanVAEConfig:
    """Sizes of a Wan2.1-style VAE. Channels per stage are `base_dim * dim_mult[i]`; every stage but the last halves
    height and width, and the stages flagged in `temporal_downsample` also halve time (the decoder mirrors it)."""

    base_dim: int
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self) -> None:
        # Accept lists (JSON, diffusers config) but store tuples so the config stays hashable and immutable.
        object.__setattr__(self, "dim_mult", tuple(self.dim_mult))
        object.__setattr__(self, "temporal_downsample", tuple(self.temporal_downsample))
        _require(is_positive_int(self.base_dim), "base_dim", "a positive int", self.base_dim)
        _require(self.z_dim == len(LATENT_MEAN), "z_dim", f"{len(LATENT_MEAN)} (the latent statistics)", self.z_dim)
        _require(
            len(self.dim_mult) >= 2 and all(is_positive_int(m) for m in self.dim_mult),
            "dim_mult",
            "at least two positive ints",
            self.dim_mult,
        )
        _require(is_positive_int(self.num_res_blocks), "num_res_blocks", "a positive int", self.num_res_blocks)
        _require(
            len(self.temporal_downsample) == len(self.dim_mult) - 1
            and all(isinstance(t, bool) for t in self.temporal_downsample),
            "temporal_downsample",
            f"{len(self.dim_mult) - 1} bools (one per downsampling stage)",
            self.temporal_downsample,
        )
        _require(
            2 ** sum(self.temporal_downsample) == TEMPORAL_WINDOW,
            "temporal_downsample",
            f"exactly two temporal stages (the official chunking assumes {TEMPORAL_WINDOW}x temporal compression)",
            self.temporal_downsample,
        )

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def encoder_dims(self) -> list[int]:
        return [self.base_dim * m for m in (1, *self.dim_mult)]

    @property
    def decoder_dims(self) -> list[int]:
        return [self.base_dim * m for m in (self.dim_mult[-1], *reversed(self.dim_mult))]


VAE_PRESETS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(base_dim=96),
    "tiny": WanVAEConfig(base_dim=8),
}


def vae_config(name: str) -> WanVAEConfig:
    """Returns the preset called exactly `name`."""
    if name not in VAE_PRESETS:
        raise ConfigError(f"VAE preset: expected one of {sorted(VAE_PRESETS)}, got {name!r}")
    return VAE_PRESETS[name]


class CausalConv3d(nn.Conv3d):
    """3-D conv that pads time on the past side only, so output frame t depends on input frames <= t.

    `padding` = (pt, ph, pw) follows the official convention: 2*pt zero frames before the clip, ph/pw on both
    spatial sides. With pt = 0 and a temporal stride it is a plain valid conv over time.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(0, ph, pw))
        self.past_frames = 2 * pt

    def folded_weight(self) -> Tensor:
        """The weight [out, in, kt, kh, kw] as a 2-D conv's [out, (kt in), kh, kw]: time taps stacked on channels."""
        taps = self.kernel_size[0] * self.in_channels
        folded = self.weight.detach().transpose(1, 2).reshape(self.out_channels, taps, *self.kernel_size[1:])
        return folded.clone()  # a copy also where reshape gives a view (kt = 1): a snapshot either way

    def forward(self, x: Tensor, context: CausalContext | None = None) -> Tensor:
        if self.past_frames:
            if context is not None and not context.recording:
                x = torch.cat([context.past(self, x.shape[0]), x], dim=2)
            else:
                x = F.pad(x, (0, 0, 0, 0, self.past_frames, 0))
                if context is not None:  # after padding: a clip shorter than the window leaves zeros in it
                    context.keep(self, x[:, :, -self.past_frames :])
        folded_weight = None if context is None else context.folded_weight(self)
        return super().forward(x) if folded_weight is None else self.conv_frames(x, folded_weight)

    def conv_frames(self, x: Tensor, folded_weight: Tensor) -> Tensor:
        """The conv over already-padded time as one 2-D conv per output frame over its window, taps on channels."""
        b, _, _, h, w = x.shape
        kt, st = self.kernel_size[0], self.stride[0]
        windows = x.unfold(2, kt, st)  # [b, c, t_out, h, w, kt]
        t_out = windows.shape[2]
        frames = windows.permute(0, 2, 5, 1, 3, 4).reshape(b * t_out, -1, h, w)  # [(b t_out), (kt c), h, w]
        y = F.conv2d(frames, folded_weight, self.bias, stride=self.stride[1:], padding=self.padding[1:])
        return y.unflatten(0, (b, t_out)).transpose(1, 2)


class WanRMSNorm(nn.Module):
    """L2-normalises over channels (dim 1), times sqrt(C) and a per-channel gamma.

    NOTE: normalises in the input dtype as the official Wan code does (diffusers upcasts fp16/bf16 to fp32), so a
    bf16 model rounds like the official bf16 tokenizer.
    """

    def __init__(self, dim: int, spatial_dims: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        # Shape (C, 1, 1[, 1]) as stored in the checkpoint: 3 trailing dims on videos, 2 on per-frame images.
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        # Indices mirror the official keys residual.{0,2,3,6}; slot 5 held dropout, an identity at inference.
        self.residual = nn.Sequential(
            WanRMSNorm(in_dim, spatial_dims=3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            WanRMSNorm(out_dim, spatial_dims=3),
            nn.SiLU(),
            nn.Identity(),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, context: CausalContext | None = None) -> Tensor:
        h = x
        for layer in self.residual:
            h = _apply(layer, h, context)
        return h + _apply(self.shortcut, x, context)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no mixing across time)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = WanRMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(frames)).reshape(b * t, 1, 3 * c, h * w)
        q, k, v = qkv.transpose(2, 3).contiguous().chunk(3, dim=-1)  # each [(b t), 1, h*w, c]
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + out.reshape(b, t, c, h, w).transpose(1, 2)


def _per_frame(module: nn.Module, x: Tensor) -> Tensor:
    """Applies a 2-D module to every frame: [b, c, t, h, w] -> [b, c', t, h', w']."""
    b, _, t, _, _ = x.shape
    y = module(x.transpose(1, 2).flatten(0, 1))  # [(b t), c', h', w']
    return y.unflatten(0, (b, t)).transpose(1, 2)


class Downsample(nn.Module):
    """Halves height and width (ZeroPad right/bottom + stride-2 conv), and time as well if `temporal`."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, context: CausalContext | None = None) -> Tensor:
        x = _per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        if context is not None and not context.recording:
            # A continuation: its first window starts on the last frame before it. [b, c, t/2, h, w]
            return self.time_conv(torch.cat([context.past(self, x.shape[0]), x], dim=2), context)
        if context is not None:
            context.keep(self, x[:, :, -1:])
        if x.shape[2] == 1:
            return x
        # NOTE: frame 0 is the official first chunk and never enters the time conv; the windows (0,1,2), (2,3,4), ...
        # are the official chunks prefixed with the cached last frame of the chunk before. [b, c, 1 + (t-1)/2, h, w]
        return torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)


class Upsample(nn.Module):
    """Doubles height and width (nearest + conv to dim/2 channels), and frames after the first if `temporal`."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        # NOTE: the official code upsamples with "nearest-exact" (through fp32, for old PyTorch's bf16). At factor 2
        # it picks the same source pixel as "nearest" (i // 2) and both only copy values, in any dtype. "nearest"
        # exports to ONNX; torch 2.13's TorchScript exporter has no symbolic for aten::_upsample_nearest_exact2d
        # (opset 17). Covered by the diffusers parity tests and test_decode_exports_to_onnx.
        self.resample = nn.Sequential(
            nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(dim, dim // 2, 3, padding=1)
        )
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: Tensor) -> Tensor:
        if self.time_conv is not None and x.shape[2] > 1:
            # NOTE: the official decoder skips the time conv on its first chunk (the 'Rep' cache entry) and starts it
            # on frame 1 with zero padding, as if frame 0 did not exist. [b, c, 1 + 2(t-1), h, w]
            x = torch.cat([x[:, :, :1], self._double_frames(x[:, :, 1:])], dim=2)
        return _per_frame(self.resample, x)

    def _double_frames(self, x: Tensor) -> Tensor:
        assert self.time_conv is not None  # only called for temporal upsamplers
        b, c, t, h, w = x.shape
        # The two channel halves of the time conv are the two output frames of each input frame.
        pairs = self.time_conv(x).view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [b, c, t, 2, h, w]
        return pairs.reshape(b, c, 2 * t, h, w)


def _middle(dim: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(WanRMSNorm(dim, spatial_dims=3), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.encoder_dims
        # 1. stem
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        # 2. stages: residual blocks, then a downsample on every stage but the last
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            blocks += [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(config.num_res_blocks)]
            if stage < len(config.temporal_downsample):
                blocks.append(Downsample(out_dim, config.temporal_downsample[stage]))
        self.downsamples = nn.Sequential(*blocks)
        # 3. middle (residual, attention, residual)
        self.middle = _middle(dims[-1])
        # 4. head to (mu, log_var)
        self.head = _head(dims[-1], 2 * config.z_dim)

    def forward(self, x: Tensor, context: CausalContext | None = None) -> Tensor:
        x = self.conv1(x, context)
        for layer in (*self.downsamples, *self.middle, *self.head):
            x = _apply(layer, x, context)
        return x


class Decoder3d(nn.Module):
    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        dims = config.decoder_dims
        temporal_upsample = config.temporal_downsample[::-1]
        # 1. stem
        self.conv1 = CausalConv3d(config.z_dim, dims[0], 3, padding=1)
        # 2. middle (residual, attention, residual)
        self.middle = _middle(dims[0])
        # 3. stages: one more residual block than the encoder, then an upsample on every stage but the last
        blocks: list[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(pairwise(dims)):
            # The previous stage's upsample conv halved the channels.
            in_dim = in_dim // 2 if stage > 0 else in_dim
            blocks += [ResidualBlock(in_dim if i == 0 else out_dim, out_dim) for i in range(config.num_res_blocks + 1)]
            if stage < len(temporal_upsample):
                blocks.append(Upsample(out_dim, temporal_upsample[stage]))
        self.upsamples = nn.Sequential(*blocks)
        # 4. head to RGB
        self.head = _head(dims[-1], 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encode` maps a clip in [-1, 1] to normalised latents (the posterior mean), `decode` inverts it.

    Inputs must be in the model's dtype and on its device. The state dict is in the official Wan key layout.
    """

    latent_mean: Tensor
    latent_std: Tensor

    def __init__(self, config: WanVAEConfig) -> None:
        super().__init__()
        self.config = config
        z_dim = config.z_dim
        self.encoder = Encoder3d(config)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)  # -> (mu, log_var); only mu is used
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(config)
        # Constants, not checkpoint weights (non-persistent); they follow the model's dtype like the official
        # wrapper's, which builds them in the VAE dtype.
        self.register_buffer("latent_mean", torch.tensor(LATENT_MEAN).view(1, z_dim, 1, 1, 1), persistent=False)
        self.register_buffer("latent_std", torch.tensor(LATENT_STD).view(1, z_dim, 1, 1, 1), persistent=False)

    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latent [B, z, 1+k, H/f, W/f] (f = spatial factor, 8).

        Causal: the first 1+4n frames alone give the same first 1+n latents as the whole clip.
        """
        self._check_clip(video)
        return self._normalized_mean(self.encoder(video))

    def encode_prefix(self, video: Tensor, fold_time_taps: bool = False) -> tuple[Tensor, CausalContext]:
        """`encode` of a clip's first frames [1, 3, 1+4n, H, W], and the context to encode the frames after them
        (`fold_time_taps`: its continuations run the convs folded, `CausalContext`)."""
        self._check_clip(video)
        if video.shape[0] != 1:
            raise InputError(f"video: a prefix is encoded for batch 1, got {list(video.shape)}")
        context = CausalContext()
        latent = self._normalized_mean(self.encoder(video, context), context)
        context.recording = False
        if fold_time_taps:
            context.fold([layer for layer in (*self.encoder.modules(), self.conv1) if isinstance(layer, CausalConv3d)])
        return latent, context

    def encode_continuation(self, video: Tensor, context: CausalContext) -> Tensor:
        """The latents of the 4k frames [B, 3, 4k, H, W] that follow a prefix, as the whole clip would give them."""
        self._check_input("video", video, channels=3)
        if video.shape[2] % TEMPORAL_WINDOW:
            raise InputError(
                f"video: a continuation has a multiple of {TEMPORAL_WINDOW} frames, got {list(video.shape)}"
            )
        return self._normalized_mean(self.encoder(video, context), context)

    def _normalized_mean(self, features: Tensor, context: CausalContext | None = None) -> Tensor:
        mu = self.conv1(features, context)[:, : self.config.z_dim]
        # NOTE: multiplies by the reciprocal, in the model dtype, as the official wrapper does (scale = 1 / std).
        return (mu - self.latent_mean) * self.latent_std.reciprocal()

    def decode(self, latent: Tensor) -> Tensor:
        """Normalised latent [B, z, 1+k, h, w] -> video [B, 3, 1+4k, h*f, w*f], clamped to [-1, 1]."""
        self._check_input("latent", latent, channels=self.config.z_dim)
        mu = latent / self.latent_std.reciprocal() + self.latent_mean
        return self.decoder(self.conv2(mu)).clamp(-1.0, 1.0)

    def _check_clip(self, video: Tensor) -> None:
        self._check_input("video", video, channels=3)
        t, h, w = video.shape[2:]
        f = self.config.spatial_factor
        if (t - 1) % TEMPORAL_WINDOW or h % f or w % f:
            raise InputError(
                f"video: expected [B, 3, 1+{TEMPORAL_WINDOW}k, H, W] with H and W divisible by {f}, "
                f"got {list(video.shape)}"
            )

    def _check_input(self, name: str, x: Tensor, channels: int) -> None:
        if x.ndim != 5 or x.shape[1] != channels or x.shape[2] == 0:
            raise InputError(f"{name}: expected shape [B, {channels}, T, H, W], got {list(x.shape)}")
        dtype = self.conv1.weight.dtype
        if x.dtype != dtype:
            raise InputError(f"{name}: expected dtype {dtype} (the model's), got {x.dtype}")
