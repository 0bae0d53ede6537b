"""The torch backend: eager (or `torch.compile`d) PyTorch networks behind the policy's network interfaces, opened
from official checkpoint files.

Its conditioning encoder is the fast exact one: on a GPU the image transforms run as tensor ops on the device
(`kernels.image_transforms`, bit-identical to the numpy reference), and the always-black first frames of every clip
(the blank and proprio slots, 5 of the 13/17 prefix frames) are encoded once per process, so a query encodes only its
camera frames.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from cosmos_edge.kernels.image_transforms import (
    FrameBatches,
    batch_frames,
    device_tables,
    transform_batches,
)
from cosmos_edge.runtime.engines.cuda_graphs import CapturedCalls, empty_cache, graph_pool
from cosmos_edge.runtime.engines.torch_arrays import TorchArrays
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.models.dit import CosmosDiT, CrossAttentionKV, TimestepModulation
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.prefix_encoder import BlackPrefixEncoder
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.models.wan_vae import WanVAE
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.api import NetworkFn, StageTimer
from cosmos_edge.runtime.policy.arrays import Array
from cosmos_edge.runtime.policy.images import check_cameras, preprocess_observation_images
from cosmos_edge.runtime.policy.latents import prefix_camera_frames
from cosmos_edge.runtime.precision import check_compile_scope

_FRAME_SIZES_KEPT = 4


class TorchAutoencoder:
    """`VideoAutoencoder` and `ConditioningEncoder` of one platform over a Wan VAE. With a `compile_mode`, the
    per-query encode of the camera frames (after the cached black prefix) is `torch.compile`d as one static graph.
    `fold_time_taps` runs that encode's convs as 2-D convs over stacked time taps (`CausalContext`); the default is
    on when compiled on CUDA, where it pays: the 12 camera frames encode in 9.8 against 13.0 ms on an H200, while
    eager it is 18.7 against 17.9 ms (benchmarks/results/gpu_check_h200.json, `vae_variants`). `cuda_graphs`
    replays that encode, with the image transforms before it, from a CUDA graph (`cuda_graphs.py`). The whole-clip
    `encode` (the reference's, uncompiled) and `decode` run as the official code does."""

    def __init__(
        self,
        vae: WanVAE,
        device: torch.device,
        platform: PlatformSpec,
        compile_mode: str | None = None,
        fold_time_taps: bool | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        self._vae = vae.eval()
        self._closed = False
        # One capture per frame-size combination (a deployment's cameras keep theirs).
        self._captured = CapturedCalls(_FRAME_SIZES_KEPT, graph_pool(device)) if cuda_graphs else None
        self._replaying = threading.Lock()  # one VAE call at a time: a capture's buffers serve one query; close waits
        if fold_time_taps is None:
            fold_time_taps = device.type == "cuda" and compile_mode is not None
        self._device = device
        self._threads = torch.get_num_threads()
        self._dtype = next(vae.parameters()).dtype
        self._platform = platform
        # What a query encodes after the black frames: the index of each frame's camera.
        self._camera_frames = [platform.cameras.index(camera) for camera in prefix_camera_frames(platform)]
        with torch.inference_mode():
            self._prefix_encoder = BlackPrefixEncoder(vae, platform, fold_time_taps)
        self._encode_prefix: Callable[[torch.Tensor], torch.Tensor] = self._prefix_encoder
        if compile_mode is not None:
            self._encode_prefix = torch.compile(self._prefix_encoder, mode=compile_mode, dynamic=False)

    @torch.inference_mode()
    def encode_conditioning(self, images: Mapping[str, np.ndarray], timer: StageTimer) -> np.ndarray:
        """Stage `preprocess` is the host's part (checks; on a GPU, flip/JPEG where the platform has them and the
        uint8 upload), `vae_encode` the device's: on a GPU the image transforms (bit-identical to the host's: on the
        CPU, Pillow's C resize beats the tensor ops, 17 ms against 108 ms for 3 cameras on 2 cores) and the encode,
        replayed from a CUDA graph per frame size when it has them."""
        self._check_open()
        cameras = self._platform.cameras
        with timer.stage("preprocess"):
            if self._device.type == "cpu":
                host_planes = preprocess_observation_images(self._platform, images)
                planes = torch.stack([torch.from_numpy(host_planes[name]) for name in cameras])
            else:
                frames = check_cameras(self._platform, images)
                prepared = batch_frames(self._platform, [frames[name] for name in cameras])
                uploaded = [torch.from_numpy(batch).to(self._device) for batch in prepared.batches]
        # One encode at a time (a capture's buffers serve one query; `close` waits for the encode in flight).
        with timer.stage("vae_encode"), self._replaying, calling_thread(self._device, self._threads):
            self._check_open()
            if self._device.type == "cpu":
                latent = self._encode_planes(planes)
            elif self._captured is None:
                latent = self._encode_frames(prepared.order, *uploaded)
            else:
                latent = self._replay(self._captured, prepared, uploaded)
            return latent.cpu().numpy()

    def _replay(self, captured: CapturedCalls, prepared: FrameBatches, uploaded: list[torch.Tensor]) -> torch.Tensor:
        """`_encode_frames` replayed from the capture of these frame sizes (made on their first query)."""
        encode = functools.partial(self._encode_frames, prepared.order)
        shapes = prepared.shapes
        tables = [table for shape in shapes for table in device_tables(self._platform, shape, self._device)]
        return captured((shapes, prepared.order), encode, uploaded, holds=tables)

    def _encode_frames(self, order: Sequence[tuple[int, int]], *batches: torch.Tensor) -> torch.Tensor:
        return self._encode_planes(transform_batches(self._platform, batches, order))

    def _encode_planes(self, planes: torch.Tensor) -> torch.Tensor:
        """Model-range planes, one per camera in platform order → the conditioning latent, float32."""
        video = torch.stack([planes[index] for index in self._camera_frames], dim=1)[None].to(self._dtype)
        return self._encode_prefix(video).float()

    @torch.inference_mode()
    def encode(self, video: np.ndarray) -> np.ndarray:
        with self._replaying:
            self._check_open()
            return self._vae.encode(self._tensor(video)).float().cpu().numpy()

    @torch.inference_mode()
    def decode(self, latent: np.ndarray) -> np.ndarray:
        with self._replaying:
            self._check_open()
            return self._vae.decode(self._tensor(latent)).float().cpu().numpy()

    def close(self) -> None:
        """Releases the VAE's weights, the captured encodes and the black prefix's latents; later calls fail. The
        image transforms' tables stay cached for the process (a few MB, bounded): another autoencoder may be
        capturing its encode from them."""
        with self._replaying:  # after an encode in flight; a second close does nothing
            if self._closed:
                return
            self._closed = True
            self._captured = None
            del self._prefix_encoder, self._encode_prefix
            _release(self._vae, self._device)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the VAE was closed with the policies that loaded it")

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self._device, self._dtype)


# Distinct batch-1 timesteps whose adaLN vectors are kept: every call of a reactive query of up to 24 denoising steps
# (ALOHA's default is 10), or of planning under a deadline without batched passes (the CPU), which scores one
# candidate at a time (10 action, 5 world model and 5 value steps with the main configuration). Each set is
# 9 x num_blocks vectors per latent frame: 11 MB for the 2B DiT in bf16, ALOHA; kept only once used. With CUDA graphs,
# also how many batch-1 timesteps are captured: the first met (the warm-up's default steps among them), later ones
# run without a graph. A capture keeps its own vectors (a replay looks none up) and this cache the others': at most
# 24 sets for a query of up to 24 distinct timesteps, 48 past that.
MODULATION_SETS_KEPT = 24


# Instructions whose bound networks (their cross-attention K/V: 117 MB each for the 2B DiT in bf16) are kept when
# the DiT replays graphs.
_BINDINGS_KEPT = 4


class TorchDiT:
    """`compile_mode`: None runs eager; otherwise a `torch.compile` mode (e.g. "default", "max-autotune"): a static
    graph for batch 1 and one with a dynamic batch for larger batches, checked against eager in
    tests/runtime/test_torch_backend.py. `compile_scope` "model" compiles the whole network; "blocks" compiles each
    transformer block, one graph shared by all of them (a 2B DiT compiles in 11 s against 64 s on 2 CPU cores; around
    them the patch embedding, adaLN and output layer run eager). Compiling per block compiles the given DiT's blocks
    in place.

    Its bound network takes x and the mask as tensors on its device (`arrays`) and returns one there, so the sampler
    runs there without a host round trip per call; host arrays are accepted too (and answered with host arrays). The
    timesteps are always a host array (`NetworkFn`). With `cuda_graphs`, batch-1 calls (the reactive query's) are
    replayed from a CUDA graph per timesteps (`cuda_graphs.py`), shared by every instruction: the graphs read the
    cross-attention K/V from one set of buffers, into which a call copies its instruction's when another instruction
    was called last, so a new instruction captures nothing. Calls run one at a time: a planning worker stopped by its
    deadline may still be in its last call when the next query starts."""

    def __init__(
        self,
        dit: CosmosDiT,
        device: torch.device,
        compile_mode: str | None = None,
        compile_scope: str = "model",
        cuda_graphs: bool = False,
    ) -> None:
        check_compile_scope(compile_scope)
        self._dit = dit.eval()
        self._device = device
        self._threads = torch.get_num_threads()
        self._closed = False
        # The batch-1 captures of every instruction, by timesteps and shapes, in one pool: calls run one at a time
        # (`_calling`), on the device's default stream. They read K/V buffers, one per K/V shape, each holding the
        # K/V of the binding it names.
        self._captured = CapturedCalls(MODULATION_SETS_KEPT, graph_pool(device)) if cuda_graphs else None
        self._graph_kv: dict[torch.Size, tuple[object, CrossAttentionKV]] = {}
        # With graphs, the networks of the last instructions bound are kept: a task switched back to, a warm-up's
        # instruction, or the planning mode's binding of the reactive query's instruction reuse their K/V.
        self._bound: OrderedDict[bytes, NetworkFn] = OrderedDict()
        self._text_kvs: weakref.WeakSet[_TextKV] = weakref.WeakSet()  # every binding's, to drop on close
        self._binding = threading.Lock()
        self._calling = threading.Lock()  # also guards `_modulations` and the graphs' K/V
        self._modulations: dict[bytes, TimestepModulation] = {}  # batch-1 timesteps -> their adaLN vectors, LRU
        self._forward: Callable[..., torch.Tensor] = self._dit
        self._forward_batched: Callable[..., torch.Tensor] = self._dit
        self._compiled_whole = compile_mode is not None and compile_scope == "model"
        if self._compiled_whole:
            # Batch 1 (the reactive query) compiles static; larger batches (planning: they vary with the passes
            # they share) compile once with a dynamic batch dimension, in their own cache (their own frame).
            self._forward = torch.compile(self._dit, mode=compile_mode, dynamic=False)
            self._forward_batched = torch.compile(_batched_call(self._dit), mode=compile_mode)
        elif compile_mode is not None:
            # The blocks' inputs are computed eagerly, so no batch dimension is marked dynamic: dynamo compiles the
            # first batch size it meets static, and the next one with a dynamic batch (automatic dynamic shapes).
            for block in self._dit.blocks:
                block.compile(mode=compile_mode)
        if compile_mode is not None:
            _make_room_for_graphs()
        self.arrays = TorchArrays(device)

    @property
    def text_dim(self) -> int:
        """The width of the instruction embeddings the network takes."""
        return self._dit.config.text_dim

    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        if self._captured is None:
            self._check_open()
            return self._bind(text_embedding)
        key = np.ascontiguousarray(text_embedding, np.float32).tobytes()
        with self._binding:
            self._check_open()
            network = self._bound.pop(key, None) or self._bind(text_embedding)
            self._bound[key] = network  # most recently used last
            while len(self._bound) > _BINDINGS_KEPT:
                del self._bound[next(iter(self._bound))]
            return network

    @torch.inference_mode()
    def _bind(self, text_embedding: np.ndarray) -> NetworkFn:
        binding = _TextKV(self._dit.precompute_text_kv(torch.from_numpy(text_embedding).to(self._device)))
        self._text_kvs.add(binding)
        dtype = self._dit.dtype

        @torch.inference_mode()
        def network(x: Array, timesteps: Array, condition_mask: Array) -> Array:
            if not isinstance(x, torch.Tensor):  # host arrays in, host arrays out
                put, fetch = self.arrays.put, self.arrays.fetch
                return fetch(network(put(x), timesteps, put(condition_mask)))
            batched = x.shape[0] > 1
            forward = self._forward_batched if batched else self._forward
            with self._calling, calling_thread(self._device, self._threads):
                self._check_open()
                kv = binding.kv
                assert kv is not None  # dropped only by `close`, checked above
                host_steps = np.ascontiguousarray(timesteps, dtype=np.float32)
                steps_key = host_steps.tobytes()  # the shape is fixed by the byte count and the batch
                captured = None if batched else self._captured
                if captured is not None:  # keyed by what fixes the kernels launched; the casts are inside the graph
                    key = (steps_key, x.shape, condition_mask.shape, kv.k.shape)
                    graph_kv = self._load_graph_kv(binding, kv)
                    replayed = captured.replay(key, (x, condition_mask))
                    if replayed is not None:  # the capture holds its own adaLN vectors: none to look up
                        return replayed
                steps = self._timestep_input(host_steps, steps_key)
                if self._compiled_whole:
                    self._dit.cache_tables(x, steps, condition_mask)

                # A capture keeps this function and what it closes over: the buffers' K/V, not this binding's.
                def call(x: torch.Tensor, mask: torch.Tensor, text: CrossAttentionKV) -> torch.Tensor:
                    inputs = (x.to(dtype), steps, mask.to(dtype))
                    if self._compiled_whole and batched:
                        for tensor in (inputs[0], inputs[2], steps):
                            torch._dynamo.mark_dynamic(tensor, 0)
                    return forward(*inputs, text).float()

                if captured is None:
                    return call(x, condition_mask, kv)
                output = captured(key, functools.partial(call, text=graph_kv), (x, condition_mask))
                if captured.captures(key):
                    self._modulations.pop(steps_key, None)  # kept by its capture alone
                return output

        return network

    def _load_graph_kv(self, binding: object, kv: CrossAttentionKV) -> CrossAttentionKV:
        """The graphs' K/V buffers of `kv`'s shape, holding `kv` (copied in, on the stream the replays run on, unless
        `binding` was the last to load them)."""
        owner, buffers = self._graph_kv.get(kv.k.shape, (None, None))
        if buffers is None:
            buffers = CrossAttentionKV(k=kv.k.clone(), v=kv.v.clone())
        elif owner is not binding:
            buffers.k.copy_(kv.k)
            buffers.v.copy_(kv.v)
        self._graph_kv[kv.k.shape] = (binding, buffers)
        return buffers

    def close(self) -> None:
        """Releases the weights, the bound instructions' K/V, the graphs, the adaLN vectors, the RoPE tables and the
        cached noise; later calls fail."""
        with self._binding, self._calling:
            self._closed = True
            self._bound.clear()
            for binding in self._text_kvs:  # callers may still hold networks bound to them
                binding.kv = None
            self._modulations.clear()
            self._captured = None
            self._graph_kv.clear()
            self._dit.rope.clear()
            self.arrays.clear()
            _release(self._dit, self._device)

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("the DiT was closed with the policies that loaded it")

    def _timestep_input(self, host: np.ndarray, key: bytes) -> torch.Tensor | TimestepModulation:
        """What the DiT takes for these host float32 timesteps (`key`: their bytes). At batch 1 (every reactive call:
        a query repeats its calls' timesteps) their adaLN vectors, computed once per distinct value and kept, so a hit
        uploads nothing; larger batches (planning's calls, whose combinations vary) compute them in the call."""
        if host.shape[0] != 1:
            return torch.from_numpy(host).to(self._device, self._dit.dtype)
        modulation = self._modulations.pop(key, None)
        if modulation is None:
            modulation = self._dit.precompute_modulation(torch.from_numpy(host).to(self._device, self._dit.dtype))
        self._modulations[key] = modulation  # most recently used last
        while len(self._modulations) > MODULATION_SETS_KEPT:
            del self._modulations[next(iter(self._modulations))]
        return modulation


# Dynamo caches compiled graphs per Python function, so every compiled DiT of the process (one per device, and a
# planning model's) adds its graphs to the same functions' caches: up to 3 each (batch 1; compiled per block, a first
# larger batch before the dynamic one). Past its per-function limit (8 by default) it would run eager, silently.
_GRAPHS_PER_DIT = 3
_COMPILED_DITS = itertools.count(1)


def _make_room_for_graphs() -> None:
    needed = _GRAPHS_PER_DIT * next(_COMPILED_DITS)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)


class _TextKV:
    """An instruction's cross-attention K/V (117 MB for the 2B DiT in bf16), which `TorchDiT.close` drops although a
    caller may still hold the network bound to it; also whose K/V the graphs' buffers hold."""

    __slots__ = ("__weakref__", "kv")

    def __init__(self, kv: CrossAttentionKV) -> None:
        self.kv: CrossAttentionKV | None = kv


def _batched_call(dit: CosmosDiT) -> Callable[..., torch.Tensor]:
    """`dit`'s forward behind a frame of its own, so that its compiled graphs are cached apart from batch 1's."""

    def forward(*inputs: torch.Tensor) -> torch.Tensor:
        return dit(*inputs)

    return forward


def _release(module: torch.nn.Module, device: torch.device) -> None:
    """Frees `module`'s weights (their storage, wherever a compiled graph still refers to the module) and hands the
    freed device memory back."""
    module.to("meta")
    if device.type == "cuda":
        empty_cache()


def calling_thread(device: torch.device, threads: int) -> contextlib.AbstractContextManager[None]:
    """Makes `device` the current CUDA device for the block (compiled kernels and CUDA graphs launch on it), and sets
    the calling thread's intra-op thread count to `threads`, the count its networks were opened with (kept afterwards,
    and the default of threads started later). Dynamo guards compiled graphs on the caller's count, and calls come
    from threads other than the one that compiled (the server's worker, planning workers): on an H200 host a pass
    on another thread than the compiling one recompiled the 2B DiT (benchmarks/results/gpu_check_h200.json, run 9)."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def default_device() -> str:
    """Where the official files run when no device is named: a CUDA device when torch sees one (the fast path),
    else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str, name: str = "device") -> torch.device:
    """`device` as a torch device this process can use; ConfigError names it as `name` (a flag, say) otherwise."""
    try:
        torch_device = torch.device(device)
    except RuntimeError as error:
        raise ConfigError(f"{name} {device}: not a torch device; expected cpu, cuda or cuda:N") from error
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} but sees no GPU"
            raise ConfigError(f"{name} {device}: this torch ({torch.__version__}) is {build}; use the cpu device")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ConfigError(f"{name} {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        if torch_device.index is None:  # as tensors name their device: caches keyed by it must find each other
            torch_device = torch.device("cuda", torch.cuda.current_device())
    elif torch_device.type != "cpu":
        raise ConfigError(f"{name} {device}: the torch backend runs on cpu or cuda[:N]")
    return torch_device


def open_autoencoder(
    tokenizer: Path,
    precision: str,
    device: str,
    platform: PlatformSpec,
    compile_mode: str | None = None,
    cuda_graphs: bool = False,
) -> TorchAutoencoder:
    """The Wan2.1 VAE of a `tokenizer.pth` (or diffusers `vae/` directory) on `device`, for `platform`'s clips."""
    torch_device = check_device(device)
    _exact_fp32(precision, torch_device)
    vae = load_wan_vae(tokenizer, TORCH_DTYPES[precision], torch_device)
    return TorchAutoencoder(vae, torch_device, platform, compile_mode, cuda_graphs=cuda_graphs)


def open_dit(
    checkpoint: Path,
    precision: str,
    device: str,
    compile_mode: str | None = None,
    compile_scope: str = "model",
    cuda_graphs: bool = False,
) -> TorchDiT:
    """The DiT of an official `.pt` (or diffusers `transformer/` directory) on `device`."""
    torch_device = check_device(device)
    _exact_fp32(precision, torch_device)
    dit = load_dit(checkpoint, TORCH_DTYPES[precision], torch_device)
    dit.fuse_qkv()  # one GEMM for self-attention q, k, v (the weights become views: no extra memory)
    return TorchDiT(dit, torch_device, compile_mode, compile_scope, cuda_graphs)


def _exact_fp32(precision: str, device: torch.device) -> None:
    """fp32 on CUDA means fp32: cuDNN convolutions (and matmuls, where enabled) would otherwise run in TF32. torch's
    switches are process-wide: they stay off for the life of the process (a host program that turns TF32 back on
    would make later plain calls TF32 while captured graphs keep fp32 kernels, and recompile compiled networks)."""
    if precision == "fp32" and device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
