"""The contract between exported graphs and the engines that run them: each graph's I/O (`GraphSpec`, declared once:
export, backends, buffers, sample inputs and the manifest derive from these tables), the one check of feeds and of
signatures against it, the graph file a backend opens, and the `GraphRunner` interface every backend meets.

Every graph takes and returns float32 at its boundary; its internal precision is the bundle's (fp32, fp16, bf16;
a bf16 bundle's VAE graphs: float32, `precision.vae_graph_precision`), cast inside the graph, so callers and buffers
never depend on the precision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from cosmos_edge.runtime.errors import EngineError, InputError
from cosmos_edge.runtime.platforms import IMAGE_SIZE, LATENT_CHANNELS, LATENT_SIZE, PlatformSpec
from cosmos_edge.runtime.policy.latents import prefix_camera_frames


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def zeros(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=self.dtype)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]


def _latent(batch: int, frames: int) -> tuple[int, ...]:
    return (batch, LATENT_CHANNELS, frames, LATENT_SIZE, LATENT_SIZE)


def dit_graph(platform: PlatformSpec, batch: int, text_kv: tuple[int, ...], prefix: str = "dit") -> GraphSpec:
    """One network evaluation for `batch` candidates; all candidates share one instruction, given as the
    cross-attention keys and values of `text_kv_graph` (shape `text_kv`, batch 1, broadcast inside the graph)."""
    frames = platform.num_latent_frames
    return GraphSpec(
        name=f"{prefix}_b{batch}",
        inputs=(
            TensorSpec("x", _latent(batch, frames)),
            TensorSpec("timesteps", (batch, frames)),
            TensorSpec("condition_mask", (batch, 1, frames, LATENT_SIZE, LATENT_SIZE)),
            TensorSpec("text_k", text_kv),
            TensorSpec("text_v", text_kv),
        ),
        outputs=(TensorSpec("velocity", _latent(batch, frames)),),
    )


def text_kv_graph(text_tokens: int, text_dim: int, text_kv: tuple[int, ...], prefix: str = "dit") -> GraphSpec:
    """The cross-attention keys and values of every DiT block for one instruction ("1 l d"): computed once per
    instruction, then held by the DiT graphs as constant inputs instead of projected again in every call."""
    return GraphSpec(
        name=f"{prefix}_text_kv",
        inputs=(TensorSpec("text_embedding", (1, text_tokens, text_dim)),),
        outputs=(TensorSpec("text_k", text_kv), TensorSpec("text_v", text_kv)),
    )


def vae_encoder_graph(platform: PlatformSpec, full_sequence: bool) -> GraphSpec:
    """The whole sequence (needed to decode future images), or the conditioning prefix from its camera frames: the
    black frames before them are encoded into the graph once, as constants (the encoder is causal)."""
    if full_sequence:
        video_frames, name = platform.num_pixel_frames, "vae_encoder_full"
    else:
        video_frames, name = len(prefix_camera_frames(platform)), "vae_encoder_cameras"
    frames = platform.num_latent_frames if full_sequence else platform.num_conditional_frames
    return GraphSpec(
        name=name,
        inputs=(TensorSpec("video", (1, 3, video_frames, IMAGE_SIZE, IMAGE_SIZE)),),
        outputs=(TensorSpec("latent", _latent(1, frames)),),
    )


def vae_decoder_graph(platform: PlatformSpec) -> GraphSpec:
    return GraphSpec(
        name="vae_decoder",
        inputs=(TensorSpec("latent", _latent(1, platform.num_latent_frames)),),
        outputs=(TensorSpec("video", (1, 3, platform.num_pixel_frames, IMAGE_SIZE, IMAGE_SIZE)),),
    )


@dataclass(frozen=True)
class GraphFile:
    """What a backend opens: an ONNX graph (and its external data) of contract `spec`, verified by the caller.

    `precision` is the graph's internal precision; `engine` a prebuilt TensorRT engine for it, if any; `cache_dir`
    where engines built on first use are kept (None: nowhere persistent); `onnx_sha256` the digest of the ONNX files
    (`files.graph_files_digest`) when the caller knows it, which engines are matched against.
    """

    spec: GraphSpec
    onnx: Path
    external_data: tuple[Path, ...] = ()
    precision: str = "fp32"
    engine: Path | None = None
    cache_dir: Path | None = None
    onnx_sha256: str | None = None


class GraphRunner(Protocol):
    """Runs one graph whose I/O is `spec`. Outputs are new arrays owned by the caller.

    An input that stays the same over many calls (the instruction's cross-attention K/V) is given once with
    `set_constant_input` (device backends upload it once) and left out of `run`'s inputs from then on.
    Runners hold engine resources (sessions, device buffers, CUDA graphs): release them with `close()`.
    """

    @property
    def spec(self) -> GraphSpec: ...

    def set_constant_input(self, name: str, array: np.ndarray) -> None: ...

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def check_feeds(spec: GraphSpec, inputs: Mapping[str, np.ndarray], constants: frozenset[str]) -> tuple[str, ...]:
    """The inputs a call streams (all but `constants`), after checking that `inputs` holds exactly them, in shape."""
    streamed = tuple(name for name in spec.input_names if name not in constants)
    if set(inputs) != set(streamed):
        constant_given = sorted(set(inputs) & constants)
        hint = f"; {constant_given} were set with set_constant_input, leave them out" if constant_given else ""
        raise InputError(f"graph {spec.name!r}: expected inputs {sorted(streamed)}, got {sorted(inputs)}{hint}")
    for name in streamed:
        check_feed(spec, name, inputs[name])
    return streamed


def check_feed(spec: GraphSpec, name: str, array: np.ndarray) -> None:
    """One input (streamed or constant) against its TensorSpec: a known name, the shape, a castable dtype."""
    if name not in spec.input_names:
        raise InputError(f"graph {spec.name!r}: expected one of inputs {spec.input_names}, got {name!r}")
    tensor = spec.inputs[spec.input_names.index(name)]
    array = np.asarray(array)
    if array.shape != tensor.shape or not np.can_cast(array.dtype, tensor.dtype, "same_kind"):
        raise InputError(
            f"graph {spec.name!r} input {name!r}: expected {tensor.dtype}{list(tensor.shape)}, "
            f"got {array.dtype}{list(array.shape)}"
        )


Signature = Mapping[str, tuple[tuple[int, ...], str]]
"""Tensor name → (shape, dtype name) as an engine or a graph file declares it; -1 for a dynamic dimension."""


class SignatureMismatch(EngineError):
    """A graph file or engine declares other inputs or outputs than its spec: not the graph the spec describes."""


def check_signature(spec: GraphSpec, found: Signature, inputs: bool, source: str) -> None:
    """The I/O an engine or an ONNX file declares against the spec's inputs (or outputs); `SignatureMismatch`
    names both."""
    tensors = spec.inputs if inputs else spec.outputs
    kind = "inputs" if inputs else "outputs"
    if set(found) != {tensor.name for tensor in tensors}:
        expected = sorted(tensor.name for tensor in tensors)
        raise SignatureMismatch(f"{source}: expected {kind} {expected} (GraphSpec {spec.name!r}), got {sorted(found)}")
    for tensor in tensors:
        shape, dtype = found[tensor.name]
        same_rank = len(shape) == len(tensor.shape)
        shape_ok = same_rank and all(d in (-1, e) for d, e in zip(shape, tensor.shape, strict=True))
        if not shape_ok or dtype != tensor.dtype:
            raise SignatureMismatch(
                f"{source} {kind[:-1]} {tensor.name!r}: expected {tensor.dtype}{list(tensor.shape)} "
                f"(GraphSpec {spec.name!r}; graphs are float32 at their boundary), got {dtype}{list(shape)}"
            )
