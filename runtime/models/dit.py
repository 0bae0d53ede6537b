"""The Cosmos-Predict2 Video2World DiT (official `MinimalV1LVGDiT`) in plain PyTorch.

Semantics follow the official network exactly (reference section 1.3); module attribute names follow the official
state-dict keys (`x_embedder.proj.1`, `t_embedder.1.linear_1`, `blocks.{i}.self_attn.q_proj`, ...), so an official
checkpoint loads after stripping its `net.` prefix (see `dit_checkpoint.py`).

What can be computed once instead of on every call: the RoPE cos/sin tables (cached per patch grid, since serving
shapes are static), through `precompute_text_kv` the cross-attention keys and values of the instruction, and through
`precompute_modulation` the adaLN vectors of a timesteps tensor (a sampler's calls repeat the same timesteps on every
query).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.models.dit_config import DiTConfig

# cos and sin, each [1, 1, T*H*W, head_dim] in float32, broadcast over batch and heads.
RopeTables = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class CrossAttentionKV:
    """Cross-attention keys (after k_norm) and values of every block for one instruction.

    k, v: "n b heads l head_dim" with n = num_blocks. A batch of 1 is broadcast to any input batch.
    """

    k: Tensor
    v: Tensor


@dataclass(frozen=True)
class TimestepModulation:
    """The adaLN vectors of one timesteps tensor "b t": everything the network computes from the timesteps.

    blocks: "n 9 b t 1 d", per block (self-attention, cross-attention, MLP) x (shift, scale, gate);
    final: "2 b t 1 d", the final layer's (shift, scale).
    """

    blocks: Tensor
    final: Tensor


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, computed in float32 like Transformer-Engine's kernel."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class VideoRope3D(nn.Module):
    """3D RoPE of the official `VideoRopePosition3DEmb` with fps modulation off; tables cached per patch grid.

    Head channels are split (t, h, w) = (44, 42, 42) for head_dim 128; each axis uses integer positions and
    theta = 10000 * ratio ** (d / (d - 2)) (NTK scaling). Holds no tensors, so a model built on the meta device
    and loaded with `assign=True` has nothing left on meta.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.axis_dims = config.rope_dims
        ratios = (config.rope_t_ratio, config.rope_h_ratio, config.rope_w_ratio)
        self.thetas = tuple(
            10000.0 * ratio ** (dim / (dim - 2)) for ratio, dim in zip(ratios, self.axis_dims, strict=True)
        )
        self.bf16_exponents = config.rope_bf16_exponents
        self._cache: dict[tuple[int, int, int, torch.device], RopeTables] = {}

    def forward(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        # int(): under the ONNX exporter's tracer the sizes arrive as 0-d tensors, which would miss the cache and
        # trace the table construction; as ints they hit it and the tables are recorded as constants.
        frames, height, width = (int(size) for size in grid)
        key = (frames, height, width, device)
        tables = self._cache.get(key)
        if tables is None:
            tables = self._cache[key] = self._build((frames, height, width), device)
        return tables

    def clear(self) -> None:
        """Drops the cached tables (not buffers: moving the module does not move or free them)."""
        self._cache.clear()

    def _axis_angles(self, axis: int, length: int, device: torch.device) -> Tensor:
        dim = self.axis_dims[axis]
        exponents = torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim
        if self.bf16_exponents:
            # The official network stores these exponents as buffers, and its inference casts them to bf16.
            exponents = exponents.to(torch.bfloat16).float()
        inv_freq = 1.0 / (self.thetas[axis] ** exponents)
        positions = torch.arange(length, device=device, dtype=torch.float32)
        return torch.outer(positions, inv_freq)  # [length, dim / 2]

    # Cached tables outlive the call that built them; built under inference mode they could not be used by a
    # later forward that records autograd (tracing, fine-tuning), so they are always built as normal tensors.
    @torch.inference_mode(False)
    def _build(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        frames, height, width = grid
        shape = (frames, height, width, -1)
        angles = torch.cat(
            [
                self._axis_angles(0, frames, device)[:, None, None, :].expand(shape),
                self._axis_angles(1, height, device)[None, :, None, :].expand(shape),
                self._axis_angles(2, width, device)[None, None, :, :].expand(shape),
            ],
            dim=-1,
        ).reshape(frames * height * width, -1)  # [THW, head_dim / 2]
        # Rotate-half convention: channel i pairs with channel i + head_dim / 2, so the angles repeat twice.
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos()[None, None], angles.sin()[None, None]


def apply_rope(x: Tensor, rope: RopeTables) -> Tensor:
    """Rotates x [B, heads, L, head_dim] in float32 (as TE's fused kernel does) and rounds once."""
    cos, sin = rope
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


class Timesteps(nn.Module):
    """Sinusoidal embedding [B, T] -> [B, T, dim] in float32, ordered [cos, sin] (official `Timesteps`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, timesteps: Tensor) -> Tensor:
        half = self.dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
        angles = timesteps.float()[..., None] * torch.exp(exponent)
        return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2 to 3*D: the adaLN-LoRA term shared by every modulation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(dim, dim, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(dim, 3 * dim, bias=False)

    def forward(self, sinusoid: Tensor) -> Tensor:
        return self.linear_2(self.activation(self.linear_1(sinusoid)))


class Patchify(nn.Module):
    """[B, C, T, H, W] -> [B, T', H', W', C*pt*ps*ps] with the official feature order (c, t-patch, h-patch, w-patch)."""

    def __init__(self, patch_temporal: int, patch_spatial: int) -> None:
        super().__init__()
        self.pt = patch_temporal
        self.ps = patch_spatial

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, frames, height, width = x.shape
        pt, ps = self.pt, self.ps
        x = x.view(batch, channels, frames // pt, pt, height // ps, ps, width // ps, ps)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, pt, ps, ps]
        return x.reshape(batch, frames // pt, height // ps, width // ps, -1)


class PatchEmbed(nn.Module):
    """Patchify + bias-free linear; `proj` is a Sequential so the weight key is `x_embedder.proj.1.weight`."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            Patchify(config.patch_temporal, config.patch_spatial),
            nn.Linear(config.patch_in_features, config.model_channels, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head attention without biases, with per-head RMSNorm on q and k (official `Attention`)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner_dim = num_heads * head_dim
        self.q_proj = nn.Linear(dim, inner_dim, bias=False)
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_proj = nn.Linear(context_dim, inner_dim, bias=False)
        self.k_norm = RMSNorm(head_dim, eps)
        self.v_proj = nn.Linear(context_dim, inner_dim, bias=False)
        self.output_proj = nn.Linear(inner_dim, dim, bias=False)
        # Export mode, off in eager use; switched on for a whole model by `explicit_attention_mode`.
        self.explicit = False

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # [B, L, H*d] -> [B, H, L, d]

    def project_q(self, x: Tensor) -> Tensor:
        return self.q_norm(self._split_heads(self.q_proj(x)))

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.k_norm(self._split_heads(self.k_proj(context))), self._split_heads(self.v_proj(context))

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.explicit:
            out = explicit_attention(q, k, v, scale=self.head_dim**-0.5)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, H, L, d], scale 1/sqrt(d)
        return self.output_proj(out.transpose(1, 2).flatten(2))  # [B, L, D]


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """softmax(scale * q k^T) v as MatMul -> Softmax -> MatMul, the subgraph TensorRT fuses into one MHA kernel.

    TensorRT's pattern match (deployment_anchors D.4) needs the scale on Q before the first MatMul and nothing
    between that MatMul and the Softmax. SDPA does not give that under torch 2.13's TorchScript ONNX exporter
    (opset 17): it computes sqrt(scale) from the runtime shape and multiplies both Q and K. Same maths as SDPA; in
    fp32 another rounding order (tests/export/test_onnx_export.py checks the exported pattern and ORT fp32 against
    eager SDPA). In bf16 it also rounds q * scale and the scores to bf16 before the softmax, which SDPA's kernels
    keep in float32: an engine that runs the subgraph unfused (ONNX Runtime) errs more than the torch path, by more
    the larger the scores (a fused TensorRT kernel's intermediate precision is its own; not measured here).
    """
    scores = (q * scale) @ k.transpose(-2, -1)  # [B, H, Lq, Lk]
    return scores.softmax(dim=-1) @ v


@contextmanager
def explicit_attention_mode(model: nn.Module) -> Iterator[None]:
    """Within the block every DiT attention of `model` runs `explicit_attention`: the ONNX export mode.

    Eager serving keeps SDPA (fused kernels, less memory); only the exporter enters this mode.
    """
    modules = [module for module in model.modules() if isinstance(module, Attention)]
    previous = [module.explicit for module in modules]
    for module in modules:
        module.explicit = True
    try:
        yield
    finally:
        for module, explicit in zip(modules, previous, strict=True):
            module.explicit = explicit


class SelfAttention(Attention):
    """Self-attention over all video tokens; RoPE on q and k after their RMSNorm."""

    qkv_weight: Tensor | None

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int, eps: float) -> None:
        super().__init__(dim, context_dim, num_heads, head_dim, eps)
        # Set by `fuse_qkv`; a buffer, so that it is module state (moved with it, seen as such by torch.compile),
        # and not persistent, so that the state dict keeps the official keys.
        self.register_buffer("qkv_weight", None, persistent=False)

    def fuse_qkv(self) -> None:
        """One projection for q, k and v: their weights become views of one [3·inner, D] matrix, so a single GEMM
        replaces three (no extra memory; the official parameter names still hold the views). Call it once the
        weights are on their device and in their dtype: a later move keeps the results but not the sharing."""
        if self.qkv_weight is not None:
            return
        fused = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]).detach()
        for index, projection in enumerate((self.q_proj, self.k_proj, self.v_proj)):
            rows = slice(index * projection.out_features, (index + 1) * projection.out_features)
            projection.weight = nn.Parameter(fused[rows], requires_grad=False)
        self.qkv_weight = fused

    def forward(self, x: Tensor, rope: RopeTables) -> Tensor:
        if self.qkv_weight is None:
            q, k, v = self.project_q(x), *self.project_kv(x)
        else:
            q, k, v = (self._split_heads(part) for part in F.linear(x, self.qkv_weight).chunk(3, dim=-1))
            q, k = self.q_norm(q), self.k_norm(k)
        return self.attend(apply_rope(q, rope), apply_rope(k, rope), v)


class CrossAttention(Attention):
    """Cross-attention to the text tokens: no RoPE, no mask (padded T5 tokens are zeros and take part)."""

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        return self.attend(self.project_q(x), *kv)


class FeedForward(nn.Module):
    """Bias-free GELU MLP (official `GPT2FeedForward`, exact GELU)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden, bias=False)
        self.activation = nn.GELU()
        self.layer2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer2(self.activation(self.layer1(x)))


def adaln_lora_mlp(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    """SiLU -> Linear(D, lora) -> Linear(lora, chunks*D); keys `.1.weight` and `.2.weight` as official."""
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, lora_dim, bias=False), nn.Linear(lora_dim, chunks * dim, bias=False))


def modulation(mlp: nn.Sequential, emb: Tensor, adaln_lora: Tensor, chunks: int) -> tuple[Tensor, ...]:
    """Per-frame (shift, scale[, gate]), each [B, T, 1, D], from emb [B, T, D] plus the shared adaLN-LoRA term."""
    out = mlp(emb)
    out = out + adaln_lora[..., : out.shape[-1]]
    return out.unsqueeze(2).chunk(chunks, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Self-attention, cross-attention and MLP, each with its own adaLN-LoRA modulation and gated residual."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim, eps = config.model_channels, config.norm_eps
        heads, head_dim, lora = config.num_heads, config.head_dim, config.adaln_lora_dim
        self.layer_norm_self_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.self_attn = SelfAttention(dim, dim, heads, head_dim, eps)
        self.layer_norm_cross_attn = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.cross_attn = CrossAttention(dim, config.text_dim, heads, head_dim, eps)
        self.layer_norm_mlp = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.mlp = FeedForward(dim, config.mlp_hidden)
        self.adaln_modulation_self_attn = adaln_lora_mlp(dim, lora, 3)
        self.adaln_modulation_cross_attn = adaln_lora_mlp(dim, lora, 3)
        self.adaln_modulation_mlp = adaln_lora_mlp(dim, lora, 3)

    def modulations(self, emb: Tensor, adaln_lora: Tensor) -> tuple[Tensor, ...]:
        """The nine [B, T, 1, D] vectors (shift, scale, gate) x (self-attention, cross-attention, MLP) from emb
        [B, T, D] and adaln_lora [B, T, 3D]."""
        mlps = (self.adaln_modulation_self_attn, self.adaln_modulation_cross_attn, self.adaln_modulation_mlp)
        return tuple(vector for mlp in mlps for vector in modulation(mlp, emb, adaln_lora, 3))

    def forward(
        self, x: Tensor, modulations: Sequence[Tensor], rope: RopeTables, text_kv: tuple[Tensor, Tensor]
    ) -> Tensor:
        """x: [B, T, HW, D] tokens grouped by latent frame; modulations: this block's `modulations`."""
        shift, scale, gate = modulations[0:3]
        h = modulate(self.layer_norm_self_attn(x), shift, scale).flatten(1, 2)  # [B, THW, D]
        x = x + gate * self.self_attn(h, rope).view_as(x)

        shift, scale, gate = modulations[3:6]
        h = modulate(self.layer_norm_cross_attn(x), shift, scale).flatten(1, 2)
        x = x + gate * self.cross_attn(h, text_kv).view_as(x)

        shift, scale, gate = modulations[6:9]
        return x + gate * self.mlp(modulate(self.layer_norm_mlp(x), shift, scale))


class FinalLayer(nn.Module):
    """Modulated LayerNorm (shift, scale from the first 2D of the adaLN-LoRA term) and the output linear."""

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        dim = config.model_channels
        self.layer_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=config.norm_eps)
        self.adaln_modulation = adaln_lora_mlp(dim, config.adaln_lora_dim, 2)
        self.linear = nn.Linear(dim, config.patch_out_features, bias=False)

    def modulations(self, emb: Tensor, adaln_lora: Tensor) -> tuple[Tensor, ...]:
        return modulation(self.adaln_modulation, emb, adaln_lora, 2)

    def forward(self, x: Tensor, modulations: Sequence[Tensor]) -> Tensor:
        shift, scale = modulations
        return self.linear(modulate(self.layer_norm(x), shift, scale))


class CosmosDiT(nn.Module):
    """Cosmos-Predict2 Video2World DiT with the official `MinimalV1LVGDiT` semantics.

    Precision follows the parameters: build or load in float32, float16 or bfloat16. Sinusoids, RMSNorms and
    RoPE are computed in float32 and rounded once, as in the official bf16 inference.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.model_channels
        # 1. Patch embedding of latent ‖ condition mask ‖ padding mask
        self.x_embedder = PatchEmbed(config)
        # 2. 3D RoPE for self-attention (no parameters)
        self.rope = VideoRope3D(config)
        # 3. Timestep embedding: [0] sinusoid, [1] MLP to the adaLN-LoRA term; the normed sinusoid is `emb`
        self.t_embedder = nn.Sequential(Timesteps(dim), TimestepEmbedding(dim))
        self.t_embedding_norm = RMSNorm(dim, config.norm_eps)
        # 4. Transformer blocks
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_blocks))
        # 5. Output
        self.final_layer = FinalLayer(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.final_layer.linear.weight.dtype

    def precompute_text_kv(self, text: Tensor) -> CrossAttentionKV:
        """Cross-attention K/V of every block for text "b l text_dim"; reuse it while the instruction is fixed."""
        if text.ndim != 3 or text.shape[-1] != self.config.text_dim:
            raise InputError(f"text: expected shape [B, L, {self.config.text_dim}], got {list(text.shape)}")
        text = text.to(self.dtype)
        blocks: list[Block] = list(self.blocks)  # type: ignore[arg-type]  # ModuleList iterates as Module
        keys, values = zip(*(block.cross_attn.project_kv(text) for block in blocks), strict=True)
        return CrossAttentionKV(k=torch.stack(keys), v=torch.stack(values))

    def fuse_qkv(self) -> None:
        """Every block's self-attention q, k and v as one projection (`SelfAttention.fuse_qkv`)."""
        for module in self.modules():
            if isinstance(module, SelfAttention):
                module.fuse_qkv()

    def cache_tables(self, x: Tensor, timesteps: Tensor | TimestepModulation, condition_mask: Tensor) -> None:
        """Builds the RoPE tables of these inputs' grid eagerly. A compiled forward must find them cached: its guards
        check the cache, so one built inside the first compiled call would force a second compilation."""
        self.rope(self._check_inputs(x, timesteps, condition_mask), x.device)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor | TimestepModulation,
        condition_mask: Tensor,
        text: Tensor | CrossAttentionKV,
    ) -> Tensor:
        """One network evaluation F(c_in * x_sigma, t).

        Args:
            x: "b c t h w" network input latent (clean latent on conditioning frames).
            timesteps: "b t" per-latent-frame t = sigma / (sigma + 1), 0 on conditioning frames, or their
                `precompute_modulation` result. The official inference rounds t to bf16 before the network; that
                rounding belongs to the caller.
            condition_mask: "b 1 t h w", 1 on conditioning frames, 0 elsewhere.
            text: "b l text_dim" text embeddings, or their `precompute_text_kv` result.

        Returns:
            "b c t h w" in the parameters' dtype (the flow velocity under rectified-flow preconditioning).
        """
        grid = self._check_inputs(x, timesteps, condition_mask)
        batch, _, frames, height, width = x.shape
        dtype = self.dtype

        # 1. Input channels: latent ‖ condition mask ‖ padding mask (all zeros: Cosmos Policy never pads)
        padding_mask = x.new_zeros(batch, 1, frames, height, width)
        x = torch.cat([x, condition_mask.to(x.dtype), padding_mask], dim=1).to(dtype)  # [B, C+2, T, H, W]

        # 2. Patch embedding
        x = self.x_embedder(x).flatten(2, 3)  # [B, T', H'*W', D]

        # 3. RoPE tables (cached per grid)
        rope = self.rope(grid, x.device)

        # 4. adaLN vectors of the timesteps, one set per latent frame
        if isinstance(timesteps, TimestepModulation):
            block_modulations: Sequence[Sequence[Tensor]] = [vectors.unbind(0) for vectors in timesteps.blocks]
            final_modulations: Sequence[Tensor] = timesteps.final.unbind(0)
        else:
            block_modulations, final_modulations = self._modulations(timesteps)

        # 5. Text keys and values
        text_kv = text if isinstance(text, CrossAttentionKV) else self.precompute_text_kv(text)
        keys, values = self._broadcast_kv(text_kv, batch)

        # 6. Transformer blocks
        for block, modulations, k, v in zip(self.blocks, block_modulations, keys, values, strict=True):
            x = block(x, modulations, rope, (k, v))

        # 7. Output projection and unpatchify
        x = self.final_layer(x, final_modulations)  # [B, T', H'*W', ps*ps*pt*C]
        return self._unpatchify(x, grid)

    def precompute_modulation(self, timesteps: Tensor) -> TimestepModulation:
        """The adaLN vectors of timesteps "b t": reuse them while the timesteps repeat (the same values as computing
        them in `forward`, from the same operations)."""
        if timesteps.ndim != 2:
            raise InputError(f"timesteps: expected shape [B, T] (one per latent frame), got {list(timesteps.shape)}")
        block_modulations, final_modulations = self._modulations(timesteps)
        return TimestepModulation(
            blocks=torch.stack([torch.stack(vectors) for vectors in block_modulations]),
            final=torch.stack(final_modulations),
        )

    def _modulations(self, timesteps: Tensor) -> tuple[list[tuple[Tensor, ...]], tuple[Tensor, ...]]:
        """Timestep embedding (sinusoid, normed as emb; the adaLN-LoRA term) and every layer's modulation vectors."""
        sinusoid = self.t_embedder[0](timesteps).to(self.dtype)  # [B, T', D]
        adaln_lora = self.t_embedder[1](sinusoid)  # [B, T', 3D]
        emb = self.t_embedding_norm(sinusoid)  # [B, T', D]
        blocks: list[Block] = list(self.blocks)  # type: ignore[arg-type]  # ModuleList iterates as Module
        return [block.modulations(emb, adaln_lora) for block in blocks], self.final_layer.modulations(emb, adaln_lora)

    def _unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        frames, height, width = grid
        pt, ps = self.config.patch_temporal, self.config.patch_spatial
        # NOTE: the output features are ordered (h-patch, w-patch, t-patch, C), which is not the inverse of the
        # patch embed's (C, t-patch, h-patch, w-patch). It looks wrong but is what the official network does.
        x = x.view(x.shape[0], frames, height, width, ps, ps, pt, -1)  # [B, T', H', W', p_h, p_w, p_t, C]
        x = x.permute(0, 7, 1, 6, 2, 4, 3, 5)  # [B, C, T', p_t, H', p_h, W', p_w]
        return x.reshape(x.shape[0], x.shape[1], frames * pt, height * ps, width * ps)

    def _broadcast_kv(self, text_kv: CrossAttentionKV, batch: int) -> tuple[Tensor, Tensor]:
        keys, values = text_kv.k, text_kv.v
        if keys.ndim != 5 or keys.shape[0] != len(self.blocks) or keys.shape[1] not in (1, batch):
            raise InputError(
                f"text K/V: expected shape [{len(self.blocks)}, 1 or {batch}, heads, L, head_dim], "
                f"got {list(keys.shape)}"
            )
        if keys.shape[1] != batch:
            keys = keys.expand(-1, batch, -1, -1, -1)
            values = values.expand(-1, batch, -1, -1, -1)
        return keys, values

    def _check_inputs(
        self, x: Tensor, timesteps: Tensor | TimestepModulation, condition_mask: Tensor
    ) -> tuple[int, int, int]:
        """Returns the (T', H', W') patch grid; raises InputError naming the malformed argument."""
        config = self.config
        if x.ndim != 5 or x.shape[1] != config.in_channels:
            raise InputError(f"x: expected shape [B, {config.in_channels}, T, H, W], got {list(x.shape)}")
        batch, _, frames, height, width = x.shape
        pt, ps = config.patch_temporal, config.patch_spatial
        if frames % pt or height % ps or width % ps:
            raise InputError(f"x: expected T divisible by {pt} and H, W by {ps}, got T={frames}, H={height}, W={width}")
        grid = (frames // pt, height // ps, width // ps)
        if any(size > limit for size, limit in zip(grid, config.max_patch_grid, strict=True)):
            raise InputError(f"x: expected a patch grid (T, H, W) within {config.max_patch_grid}, got {grid}")
        if isinstance(timesteps, TimestepModulation):
            vectors = (batch, grid[0], 1, config.model_channels)
            blocks, final = (len(self.blocks), 9, *vectors), (2, *vectors)
            if (tuple(timesteps.blocks.shape), tuple(timesteps.final.shape)) != (blocks, final):
                raise InputError(
                    f"timesteps: expected a modulation of blocks {list(blocks)} and final {list(final)}, got "
                    f"{list(timesteps.blocks.shape)} and {list(timesteps.final.shape)}"
                )
        elif tuple(timesteps.shape) != (batch, grid[0]):
            raise InputError(
                f"timesteps: expected shape [{batch}, {grid[0]}] (one per latent frame), got {list(timesteps.shape)}"
            )
        if tuple(condition_mask.shape) != (batch, 1, frames, height, width):
            raise InputError(
                f"condition_mask: expected shape [{batch}, 1, {frames}, {height}, {width}], "
                f"got {list(condition_mask.shape)}"
            )
        return grid
