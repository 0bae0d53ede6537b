"""One device run: exactness of the fast path on the GPU, and per-stage timings of the official path against it.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_<card>.json [--deadline-s 400]
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke.json      # CPU, tiny sizes: the script runs

Sections, each written to the JSON as soon as it finishes (an interrupted run still reports), skipped when the deadline
would not leave time for them; a table of the timed queries is printed last:

1. `environment`: device, torch, CUDA.
2. `preprocess_exact`: the torch image transforms on the device against the numpy/Pillow reference (bit-identical).
3. `sampler_exact`: a sampling pass (mixed step counts) on device tensors against the numpy sampler (bit-identical).
4. `query_exact`: tiny random-weight models, ALOHA, 3 steps: the fast path on the device (eager and compiled) in fp32
   against the official whole-sequence path in fp32 on the CPU (max abs error of normalised actions, target ≤ 1e-4),
   and bf16 compiled on the device against the same fp32 reference; compiled with and without CUDA graphs (the
   replays must give the same bits).
5. `query_official`, `query_fast_eager`, `query_fast_compiled`, `query_fast_graphs` (compiled and replayed from CUDA
   graphs: what `act` and `serve` run on CUDA): the real sizes (Cosmos-Predict2-2B DiT, Wan2.1 VAE, random weights,
   bf16), ALOHA, 1 step: medians over `--runs` queries after warm-up, per stage and whole, all in this process.
6. `served_query`: what `serve` gives with its defaults (both modes; on CUDA compiled, CUDA graphs, bf16): the CLI in
   a process of its own, then a `PolicyClient` over loopback TCP sending 224x224 frames as the ALOHA controller does:
   seconds until it answers, the first reactive reply's round trip after the warm-up, for another instruction than
   the warm-up's (work the warm-up left to the server's worker thread, a compilation or a capture, shows there), the
   median of `--runs`, and the first two planning replies'; then a third planning query asking every candidate's
   results (the shape of `candidate_actions_by_depth`).
7. `query_profile`: the default (compiled, CUDA graphs) query under torch's profiler: kernel time per query by kind
   (GEMM, conv, attention, Triton, copies), the top kernels, and the device's busy time against the wall time.
8. `planning_timing`: best of 8 with the official main configuration on one device, compiled, after `serve`'s
   warm-up: passes batched (the default on a GPU) against pass after pass, and one query with a 1.5 s planning
   deadline.
9. `vae_variants`: the 12 camera frames' encode (after the cached black prefix) with 3-D convs and with the encoder's
   convs folded into 2-D convs over stacked time taps (CUDA's default), eager, compiled, and compiled with cuDNN's
   benchmark mode: median ms, the largest difference from the plain encode, and the error against fp32.
10. `query_fast_cuda_graphs`: the fast path compiled in torch's "reduce-overhead" mode (CUDA graphs), 1 step.
11. `attention_backends`: the DiT's self-attention per SDPA backend (flash, cuDNN, memory-efficient).
12. `dit_variants`: the DiT alone at batch 1, eager and compiled, computing the adaLN vectors of its timesteps in
    the call against taking them precomputed (what the torch backend does at batch 1): median ms and the largest
    difference between the two.
13. `dit_attention_order`: the compiled DiT at batch 1 with SDPA's default backend order and with cuDNN attention first:
    median ms and each one's error against the fp32 DiT.
14. `dit_compile_scopes`: the DiT alone at batch 1, compiled whole against compiled per block (`--compile-scope`):
    median ms, and the first call's time with Inductor's on-disk caches off (kernels this process already built are
    still reused; `benchmarks/compile_time.py` times each scope cold in a process of its own).
15. `dit_compile_modes`: the DiT alone at batch 1, compiled "default" against "max-autotune-no-cudagraphs".
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform as host
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from cosmos_edge.kernels.image_transforms import transform_frames
from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.engines.torch_arrays import TorchArrays
from cosmos_edge.runtime.engines.torch_networks import open_dit
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.models.dit_checkpoint import load_dit
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import images as reference_images
from cosmos_edge.runtime.policy.api import ActionQuery, CandidateResults, ChunkResult, Observation
from cosmos_edge.runtime.policy.arrays import HOST_ARRAYS
from cosmos_edge.runtime.policy.latents import BLACK
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.planning import PlanningPolicy
from cosmos_edge.runtime.policy.planning_config import PlanningConfig
from cosmos_edge.runtime.policy.sampler import Denoiser, sample

ALOHA = platform_spec("aloha")
# A candidate SDPA backend order for the DiT on CUDA (`dit_attention_order`): cuDNN's fused attention first, the fastest
# on the self-attention alone (`attention_backends`). On an H200 the compiled DiT did not get faster with it.
CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# Every section, in the order `main` runs them, with the seconds each needs at least (the longest an H200 run took,
# compilation included, benchmarks/results/gpu_check_h200.json): one that has less left is skipped, as nothing stops
# a section once it started.
SECTIONS: dict[str, float] = {
    "environment": 0,
    "preprocess_exact": 5,
    "sampler_exact": 5,
    "query_exact": 90,
    "query_official": 30,
    "query_fast_eager": 30,
    "query_fast_compiled": 150,
    "query_fast_graphs": 100,
    "served_query": 280,  # ready after 214 s on a cold Inductor cache, 251 s in all
    "query_profile": 150,
    "planning_timing": 240,
    "vae_variants": 60,
    "query_fast_cuda_graphs": 120,
    "attention_backends": 10,
    "dit_variants": 120,
    "dit_attention_order": 140,
    "dit_compile_scopes": 90,
    "dit_compile_modes": 260,
}


EXACTNESS = frozenset({"preprocess_exact", "sampler_exact", "query_exact"})


class Report:
    def __init__(self, path: Path, deadline_s: float, only: set[str] | None) -> None:
        if only is not None and (unknown := sorted(only - SECTIONS.keys())):
            raise SystemExit(f"--only: unknown sections {unknown}; expected names of {list(SECTIONS)}")
        self.path = path
        self.data: dict[str, Any] = {"command": "python benchmarks/gpu_check.py", "sections": {}}
        self.end = time.monotonic() + deadline_s
        self.only = only

    def left_s(self) -> float:
        return self.end - time.monotonic()

    def section(self, name: str, run: Callable[[], dict[str, Any]]) -> None:
        if self.only is not None and name not in self.only:
            return
        needs_s = SECTIONS[name]
        if self.left_s() < needs_s:
            self.data["sections"][name] = {"skipped": f"{self.left_s():.0f} s left, needs about {needs_s:.0f} s"}
        else:
            started = time.monotonic()
            try:
                result = run()
            except Exception as error:  # a failed section is reported, the others still run
                result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
            self.data["sections"][name] = result | {"seconds": round(time.monotonic() - started, 1)}
        self.path.write_text(json.dumps(self.data, indent=2))
        print(f"{name}: {json.dumps(self.data['sections'][name])[:300]}", flush=True)

    def failed(self) -> list[str]:
        """The sections that failed: an `error` in their result, an exactness check not `passed`, or an exactness
        check skipped for want of time (a run that did not check exactness did not pass)."""
        return [
            name
            for name, result in self.data["sections"].items()
            if "error" in result or result.get("passed") is False or (name in EXACTNESS and "skipped" in result)
        ]

    def print_table(self) -> None:
        """The timed queries, one line each: total and stage medians in ms."""
        stages = ("preprocess", "vae_encode", "dit", "denoise_total", "readout")
        print(f"{'query':<24}{'total':>8}" + "".join(f"{stage:>15}" for stage in stages))
        for name, section in self.data["sections"].items():
            if "total_ms_p50" in section:
                cells = "".join(f"{section['stage_ms_p50'].get(stage, 0.0):>15.2f}" for stage in stages)
                print(f"{name:<24}{section['total_ms_p50']:>8.2f}{cells}")


def observation(seed: int) -> Observation:
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for name in ALOHA.cameras}
    return Observation(images, rng.uniform(-0.2, 0.2, ALOHA.proprio_dim).astype(np.float32))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device.startswith("cuda") else host.processor() or host.machine()
    # Compiled graphs are guarded on the calling thread's intra-op thread count: this one's and a new thread's.
    on_new_thread: list[int] = []
    thread = threading.Thread(target=lambda: on_new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return {
        "device": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": host.python_version(),
        "cpu_threads": {"main": torch.get_num_threads(), "new_thread": on_new_thread[0]},
    }


def median_ms(run: Callable[[], object], device: str, runs: int) -> float:
    for _ in range(2):
        run()
    times = []
    for _ in range(runs):
        synchronize(device)
        started = time.perf_counter()
        run()
        synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(times), 3)


def preprocess_exact(device: str) -> dict[str, Any]:
    frames = observation(1).images
    cameras = list(frames)
    transformed = transform_frames(ALOHA, [frames[camera] for camera in cameras], torch.device(device))
    identical = {}
    for camera, got in zip(cameras, transformed.cpu().numpy(), strict=True):
        expected = reference_images.to_model_range(reference_images.transform_image(ALOHA, camera, frames[camera]))
        identical[camera] = bool(np.array_equal(got, expected))
    return {
        "bit_identical": identical,
        "passed": all(identical.values()),
        "three_cameras_ms": median_ms(
            lambda: transform_frames(ALOHA, list(frames.values()), torch.device(device)), device, 20
        ),
    }


def sampler_exact(device: str) -> dict[str, Any]:
    def network(x_in: Any, timesteps: Any, mask: Any) -> Any:  # arithmetic numpy and tensors both run
        if isinstance(x_in, torch.Tensor):  # the sampler passes timesteps as a host array
            timesteps = torch.from_numpy(timesteps).to(x_in.device)
        return 0.3 * x_in * (1 + timesteps[:, None, :, None, None]) + mask - 0.1 * x_in * x_in

    shape = (4, 16, 11, 28, 28)
    clean = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    masks = np.zeros((4, 1, 11, 1, 1), np.float32)
    masks[:, :, :5] = 1
    seeds, steps = [3, 4, 5, 6], [5, 1, 3, 10]
    on_host = sample(Denoiser(network, HOST_ARRAYS), clean, masks, seeds, steps)
    arrays = TorchArrays(torch.device(device))
    on_device = arrays.fetch(sample(Denoiser(network, arrays), clean, masks, seeds, steps))
    identical = bool(np.array_equal(on_device, on_host))
    return {"bit_identical": identical, "passed": identical, "max_abs": float(np.abs(on_device - on_host).max())}


def normalised_error(stats: DatasetStats, got: ChunkResult, expected: ChunkResult) -> float:
    span = stats.actions_max - stats.actions_min
    return float(np.abs(2.0 * (got.actions - expected.actions) / span).max())


def query_exact(device: str, root: Path) -> dict[str, Any]:
    files = write_random_assets(root / "tiny", RandomAssetsSpec("tiny", "aloha", seed=7))
    stats = DatasetStats.from_json(files.stats, ALOHA)
    queries = [ActionQuery(observation(seed), "fold the t-shirt", seed=195 + seed, steps=3) for seed in range(3)]
    with load_policies(CheckpointSource(files, encode_full_sequence=True), devices=["cpu"]) as reference:
        expected = [reference.reactive.infer(query) for query in queries]
    target, target_bf16 = 1e-4, 1e-2  # normalised action units, against the fp32 CPU reference (bf16: as tests/)
    result: dict[str, Any] = {"target_fp32": target, "target_bf16": target_bf16}
    answers = {}
    graphs = device.startswith("cuda")
    for name, precision, compile_mode, cuda_graphs in (
        ("fp32", "fp32", None, False),
        ("fp32_compiled", "fp32", "default", False),
        ("fp32_compiled_graphs", "fp32", "default", graphs),
        ("bf16_compiled", "bf16", "default", False),
        ("bf16_compiled_graphs", "bf16", "default", graphs),
    ):
        source = CheckpointSource(files, precision=precision, compile_mode=compile_mode, cuda_graphs=cuda_graphs)
        with load_policies(source, devices=[device]) as fast:
            got = answers[name] = [fast.reactive.infer(query) for query in queries]
        result[f"{name}_max_action_error"] = max(map(normalised_error, [stats] * 3, got, expected))
        result[f"{name}_max_value_error"] = max(abs(g.value - e.value) for g, e in zip(got, expected, strict=True))
    for precision in ("fp32", "bf16"):  # the same kernels, replayed: the same bits
        pairs = zip(answers[f"{precision}_compiled"], answers[f"{precision}_compiled_graphs"], strict=True)
        result[f"{precision}_graphs_bit_identical"] = all(
            np.array_equal(a.actions, b.actions) and a.value == b.value for a, b in pairs
        )
    bounds = {name: target if name.startswith("fp32") else target_bf16 for name in answers}
    result["passed"] = all(result[f"{name}_max_action_error"] <= bound for name, bound in bounds.items()) and all(
        result[f"{precision}_graphs_bit_identical"] for precision in ("fp32", "bf16")
    )
    return result


def timed_queries(files: CheckpointFiles, device: str, runs: int, **source: Any) -> dict[str, Any]:
    if device.startswith("cuda"):
        gc.collect()  # models of earlier sections that only cycles still hold
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # What earlier sections still hold (e.g. a model a compiled graph refers to): the peak counts it, its own does not.
    before = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else None
    with load_policies(CheckpointSource(files, precision="bf16", **source), devices=[device]) as loaded:
        policy = loaded.reactive
        query = ActionQuery(observation(2), "fold the t-shirt", seed=195, steps=1)
        started = time.perf_counter()
        for _ in range(3):  # warm-up: kernels, compilation, the instruction's K/V
            policy.infer(query)
        warm_up_s = round(time.perf_counter() - started, 1)
        totals, stages = [], []
        for _ in range(runs):
            synchronize(device)
            started = time.perf_counter()
            result = policy.infer(query)
            synchronize(device)
            totals.append((time.perf_counter() - started) * 1e3)
            stages.append(result.timings_ms)
    names = list(dict.fromkeys(name for timing in stages for name in timing))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "config": f"aloha, bf16, 1 step, {runs} runs after 3 warm-up queries",
        "total_ms_p50": round(statistics.median(totals), 2),
        "total_ms_min": round(min(totals), 2),
        "stage_ms_p50": {name: round(statistics.median(t.get(name, 0.0) for t in stages), 2) for name in names},
        "warm_up_s": warm_up_s,
        "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
        "gpu_memory_before_gib": None if before is None else round(before, 2),
        "own_peak_gpu_memory_gib": None if peak is None or before is None else round(peak - before, 2),
    }


# Kernel names by kind, for the profile's summary (cuBLAS/CUTLASS GEMMs, cuDNN convs, fused attention, Inductor's
# Triton kernels, copies); the first match wins.
KERNEL_KINDS = (
    ("triton", re.compile(r"^triton", re.IGNORECASE)),  # first: Inductor names fused kernels after their ops
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.IGNORECASE)),
    ("conv", re.compile(r"conv|fprop|dgrad|wgrad", re.IGNORECASE)),
    ("gemm", re.compile(r"gemm|gemv|cutlass|nvjet|xmma|matmul", re.IGNORECASE)),
    ("copy", re.compile(r"memcpy|memset|copy", re.IGNORECASE)),
)


def query_profile(files: CheckpointFiles, device: str, queries: int = 5) -> dict[str, Any]:
    """Where a compiled 1-step query's time goes on the device (with CUDA graphs there, the default): kernel time per
    query by kind, the top kernels, and the device's busy time against the wall time (the gap is launch and host work,
    and the profiler's own)."""
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    source = CheckpointSource(files, precision="bf16", compile_mode="default", cuda_graphs=on_cuda)
    with load_policies(source, devices=[device]) as loaded:
        query = ActionQuery(observation(2), "fold the t-shirt", seed=195, steps=1)
        for _ in range(3):
            loaded.reactive.infer(query)
        synchronize(device)
        started = time.perf_counter()
        with profile(activities=activities) as profiled:
            for _ in range(queries):
                loaded.reactive.infer(query)
            synchronize(device)
        wall_ms = (time.perf_counter() - started) * 1e3 / queries
    kernels = [
        event
        for event in profiled.key_averages()
        if (event.device_type == DeviceType.CUDA) == on_cuda
        and event.self_device_time_total + event.self_cpu_time_total
    ]

    def ms(event: Any) -> float:  # microseconds over all profiled queries -> ms per query
        return (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1e3 / queries

    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = next((name for name, pattern in KERNEL_KINDS if pattern.search(event.key)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + ms(event)
    top = sorted(kernels, key=ms, reverse=True)[:25]
    return {
        "config": f"aloha, bf16, compiled, CUDA graphs {on_cuda}, 1 step, {queries} profiled queries after 3 warm-up",
        "wall_ms_per_query": round(wall_ms, 2),
        "kernel_ms_per_query": round(sum(map(ms, kernels)), 2),
        "kernel_ms_by_kind": {kind: round(value, 2) for kind, value in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": event.key[:120], "ms_per_query": round(ms(event), 3), "calls_per_query": event.count // queries}
            for event in top
        ],
    }


def vae_variants(device: str, files: CheckpointFiles, runs: int) -> dict[str, Any]:
    """The 12 camera frames' encode after the cached black prefix, bf16: the 3-D convs against the encoder's convs
    folded into 2-D convs over stacked time taps (`CausalContext`, CUDA's compiled default), eager and compiled;
    median ms, the largest difference from the plain eager encode, and each one's error against an fp32 encode."""
    size = (1, 3, 5, 224, 224)
    generator = torch.Generator(device).manual_seed(0)
    video = torch.rand((1, 3, 12, 224, 224), generator=generator, device=device) * 2 - 1
    result: dict[str, Any] = {"frames": "12 camera frames after the cached black prefix, bf16"}

    def encoder(dtype: torch.dtype, fold: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        vae = load_wan_vae(files.tokenizer, dtype, device)
        _, context = vae.encode_prefix(torch.full(size, float(BLACK), dtype=dtype, device=device), fold)
        return lambda clip: vae.encode_continuation(clip, context)

    cudnn = torch.backends.cudnn
    allow_tf32, benchmark_mode = cudnn.allow_tf32, cudnn.benchmark
    try:
        with torch.inference_mode():
            cudnn.allow_tf32 = False
            exact = encoder(torch.float32, False)(video).float()
            cudnn.allow_tf32 = allow_tf32
            clip = video.to(torch.bfloat16)
            plain = encoder(torch.bfloat16, False)(clip)
            for fold in (False, True):
                eager = encoder(torch.bfloat16, fold)
                compiled = torch.compile(eager, dynamic=False)
                for mode, encode, benchmark in (
                    ("eager", eager, False),
                    ("compiled", compiled, False),
                    ("compiled_cudnn_benchmark", compiled, True),
                ):
                    cudnn.benchmark = benchmark
                    latent = encode(clip)
                    result[f"{'folded_time_taps' if fold else 'conv3d'}_{mode}"] = {
                        "median_ms": median_ms(functools.partial(encode, clip), device, runs),
                        "max_abs_vs_plain": float((latent - plain).abs().max()),
                        "vs_fp32_max_abs": float((latent.float() - exact).abs().max()),
                        "vs_fp32_mean_abs": float((latent.float() - exact).abs().mean()),
                    }
    finally:
        cudnn.allow_tf32, cudnn.benchmark = allow_tf32, benchmark_mode
    return result


def dit_variants(device: str, files: CheckpointFiles, config: str, runs: int) -> dict[str, Any]:
    """The DiT at batch 1 with its timesteps' adaLN vectors computed in the call or precomputed, eager and compiled."""
    dit = load_dit(files.checkpoint, torch.bfloat16, torch.device(device))
    dit.fuse_qkv()
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn((1, 16, 11, 28, 28), generator=generator, device=device)
    timesteps = torch.where(torch.arange(11, device=device) < 5, 0.0, 0.9877)[None].to(torch.bfloat16)
    mask = torch.zeros((1, 1, 11, 28, 28), device=device)
    mask[:, :, :5] = 1.0
    inputs = (x.to(torch.bfloat16), mask.to(torch.bfloat16))
    result: dict[str, Any] = {"shape": "batch 1, 11 latent frames of 28x28 (aloha), bf16"}
    with torch.inference_mode():
        text = torch.randn((1, 512, dit_config(config).text_dim), generator=generator, device=device)
        kv = dit.precompute_text_kv(text)
        modulation = dit.precompute_modulation(timesteps)
        for name, forward in (("eager", dit), ("compiled", torch.compile(dit, dynamic=False))):
            in_call = functools.partial(forward, inputs[0], timesteps, inputs[1], kv)
            precomputed = functools.partial(forward, inputs[0], modulation, inputs[1], kv)
            result[name] = {
                "in_call_ms": median_ms(in_call, device, runs),
                "precomputed_ms": median_ms(precomputed, device, runs),
                "max_abs_difference": float((precomputed().float() - in_call().float()).abs().max()),
            }
    return result


def dit_attention_order(device: str, files: CheckpointFiles, config: str, runs: int) -> dict[str, Any]:
    """The compiled DiT at batch 1 (adaLN precomputed) with SDPA's default backend order and with cuDNN attention
    first: median ms, and the error of each against the DiT in fp32 (eager, no TF32)."""
    generator = torch.Generator(device).manual_seed(0)
    x = torch.randn((1, 16, 11, 28, 28), generator=generator, device=device)
    timesteps = torch.where(torch.arange(11, device=device) < 5, 0.0, 0.9877)[None]
    mask = torch.zeros((1, 1, 11, 28, 28), device=device)
    mask[:, :, :5] = 1.0
    text = torch.randn((1, 512, dit_config(config).text_dim), generator=generator, device=device)
    result: dict[str, Any] = {"shape": "batch 1, 11 latent frames of 28x28 (aloha)"}
    with torch.inference_mode():
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            exact_dit = load_dit(files.checkpoint, torch.float32, torch.device(device))
            exact = exact_dit(x, timesteps, mask, exact_dit.precompute_text_kv(text)).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        del exact_dit
        dit = load_dit(files.checkpoint, torch.bfloat16, torch.device(device))
        dit.fuse_qkv()
        kv = dit.precompute_text_kv(text)
        bf16 = torch.bfloat16
        inputs = (x.to(bf16), dit.precompute_modulation(timesteps.to(bf16)), mask.to(bf16), kv)
        orders = (
            ("default_order", contextlib.nullcontext),
            ("cudnn_first", lambda: sdpa_kernel(CUDNN_FIRST, set_priority=True)),
        )
        for name, order in orders:
            torch._dynamo.reset()  # a fresh trace: the backend is chosen when SDPA is traced
            with order():
                call = functools.partial(torch.compile(dit, dynamic=False), *inputs)
                error = (call().float() - exact).abs()
                result[name] = {
                    "median_ms": median_ms(call, device, runs),
                    "vs_fp32_max_abs": float(error.max()),
                    "vs_fp32_mean_abs": float(error.mean()),
                }
    return result


def dit_compiled(
    device: str, files: CheckpointFiles, config: str, runs: int, variants: tuple[tuple[str, str], ...]
) -> dict[str, Any]:
    """The DiT alone at batch 1 (the reactive query's call) through the torch backend, per (`torch.compile` mode,
    compile scope): first call (compilation included) and median ms."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 16, 11, 28, 28)).astype(np.float32)
    timesteps = np.where(np.arange(11) < 5, 0.0, 0.9877).astype(np.float32)[None]
    mask = np.zeros((1, 1, 11, 28, 28), np.float32)
    mask[:, :, :5] = 1.0
    result: dict[str, Any] = {"shape": "batch 1, 11 latent frames of 28x28 (aloha), bf16"}
    for mode, scope in variants:
        torch._dynamo.reset()
        dit = open_dit(files.checkpoint, "bf16", device, mode, scope)
        text = rng.standard_normal((1, 512, dit_config(config).text_dim)).astype(np.float32)
        network = dit.bind_text(text)
        arrays = dit.arrays
        inputs: tuple[Any, ...] = (arrays.put(x), timesteps, arrays.put(mask))  # timesteps on the host, as sampled
        started = time.perf_counter()
        with inductor_config.patch(force_disable_caches=True):  # cold, as on a first start: no on-disk cache hit
            network(*inputs)
        synchronize(device)
        name = f"{mode}_{scope}"
        result[name] = {"first_call_s": round(time.perf_counter() - started, 1)}
        result[name]["median_ms"] = median_ms(functools.partial(network, *inputs), device, runs)
        del dit, network
    return result


def attention_backends(device: str, config: str, runs: int) -> dict[str, Any]:
    """The DiT's self-attention at batch 1 (ALOHA's 2156 tokens) per SDPA backend: median ms and the largest
    difference from float32 math attention on the same bf16 inputs."""
    dit = dit_config(config)
    tokens = 11 * (28 // dit.patch_spatial) ** 2
    generator = torch.Generator(device).manual_seed(0)
    q, k, v = (
        torch.randn((1, dit.num_heads, tokens, dit.head_dim), generator=generator, device=device).to(torch.bfloat16)
        for _ in range(3)
    )
    with sdpa_kernel(SDPBackend.MATH):
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    result: dict[str, Any] = {"shape": f"1 x {dit.num_heads} heads x {tokens} tokens x {dit.head_dim}, bf16"}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        try:
            with sdpa_kernel(backend):
                attend = functools.partial(F.scaled_dot_product_attention, q, k, v)
                result[backend.name] = {
                    "median_ms": median_ms(attend, device, runs),
                    "max_abs_vs_fp32_math": float((attend().float() - reference).abs().max()),
                }
        except RuntimeError as error:  # a backend this build or card lacks
            result[backend.name] = {"unavailable": str(error).splitlines()[0][:200]}
    return result


PLANNING_RUNS = 3  # timed queries of each planning mode, after one warm-up query each


def planning_timing(device: str, files: CheckpointFiles) -> dict[str, Any]:
    # As `serve` runs on CUDA: compiled, the batch-1 calls replayed from CUDA graphs.
    source = CheckpointSource(files, precision="bf16", compile_mode="default", cuda_graphs=device.startswith("cuda"))
    result: dict[str, Any] = {
        "config": "aloha, bf16, compiled, CUDA graphs on CUDA, best of 8, official main configuration"
    }
    with load_policies(source, devices=[device], planning=PlanningConfig(num_queries_best_of_n=8)) as loaded:
        started = time.perf_counter()
        loaded.warm_up()  # as `serve` does before it answers: among them the batch-1 graphs a deadline's query calls
        result["serve_warm_up_s"] = round(time.perf_counter() - started, 1)
        device_networks = list(loaded.device_networks)
        query = ActionQuery(observation(3), "fold the t-shirt", seed=195)
        modes = {
            "batched": PlanningPolicy(loaded.reactive.model, device_networks, batch_passes=True),
            "pass_after_pass": PlanningPolicy(loaded.reactive.model, device_networks, batch_passes=False),
        }
        with contextlib.ExitStack() as closing:
            for name, policy in modes.items():
                closing.callback(policy.close)
                started = time.perf_counter()
                policy.infer(query)  # warm-up: compilation of this mode's batch sizes, first-use costs
                result[f"{name}_warm_up_s"] = round(time.perf_counter() - started, 1)
            seconds: dict[str, list[float]] = {name: [] for name in modes}
            chosen: dict[str, CandidateResults] = {}
            for _ in range(PLANNING_RUNS):  # alternated, so that both modes see the same state of the machine
                for name, policy in modes.items():
                    synchronize(device)
                    started = time.perf_counter()
                    candidates = policy.infer(query).candidates
                    synchronize(device)
                    seconds[name].append(round(time.perf_counter() - started, 3))
                    assert candidates is not None
                    chosen[name] = candidates
        for name, candidates in chosen.items():
            result[name] = {"s_p50": statistics.median(seconds[name]), "runs": seconds[name]}
            result[name] |= {"chosen": candidates.chosen, "values": [round(float(v), 5) for v in candidates.values]}
        result["same_choice_and_values"] = result["batched"]["chosen"] == result["pass_after_pass"]["chosen"] and (
            result["batched"]["values"] == result["pass_after_pass"]["values"]
        )
        result["passed"] = result["same_choice_and_values"]
        with contextlib.closing(PlanningPolicy(loaded.reactive.model, device_networks, deadline_ms=1500)) as policy:
            synchronize(device)
            started = time.perf_counter()
            cut = policy.infer(query)
            synchronize(device)
            assert cut.candidates is not None
            result["deadline_1500_ms"] = {
                "answered_ms": round((time.perf_counter() - started) * 1e3, 1),
                "outcome": cut.candidates.outcome.value,
                "scored": int(np.isfinite(cut.candidates.values).sum()),
            }
    return result


def served_query(files: CheckpointFiles, device: str, runs: int, log_dir: Path, within_s: float) -> dict[str, Any]:
    # Imported here: pyzmq may be missing on a device machine, and only this section needs it.
    from cosmos_edge.robot_bridge.client import ConnectionLost, PolicyClient, RequestTimeout

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    command = [sys.executable, "-m", "cosmos_edge.cli.main", "serve", "--platform", files.platform, "--devices", device]
    for flag in ("checkpoint", "tokenizer", "stats", "text_embeddings"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(files, flag))]
    log = log_dir / "serve.log"  # beside the report: kept, whatever happens
    started = time.perf_counter()
    with log.open("w") as output:
        server = subprocess.Popen([*command, "--endpoint", endpoint], stdout=output, stderr=subprocess.STDOUT)
    steps = ALOHA.default_action_steps
    instruction = "put the candy in the bag"  # not the warm-up's (the first of the file: "fold the t-shirt")
    config = (
        f"serve's defaults on {device}, ALOHA ({steps} steps), 224x224 frames, {runs} reactive replies, {instruction!r}"
    )
    result: dict[str, Any] = {"config": config}
    try:
        ready = False
        while not ready and server.poll() is None and time.perf_counter() - started < within_s:
            try:  # until it answers: loading, compilation, warm-up
                with PolicyClient(endpoint, timeout_s=2.0) as client:
                    client.ping()
                ready = True
            except (RequestTimeout, ConnectionLost):  # not up yet, or gone while loading (said below)
                continue
        if not ready:
            ended = "still loading" if server.poll() is None else f"exited with {server.returncode}"
            return result | {"error": f"serve not ready within {within_s:.0f} s ({ended}): {log.read_text()[-600:]}"}
        result["ready_s"] = round(time.perf_counter() - started, 1)
        rng = np.random.default_rng(4)
        images = {name: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for name in ALOHA.cameras}
        observation = Observation(images, rng.uniform(-0.2, 0.2, ALOHA.proprio_dim).astype(np.float32))
        with PolicyClient(endpoint, timeout_s=600.0) as client:

            def round_trip_ms(obs_id: int, mode: str) -> float:
                sent = time.perf_counter()
                client.act(observation, instruction, obs_id=obs_id, capture_time_ns=time.time_ns(), mode=mode)
                return (time.perf_counter() - sent) * 1e3

            result["first_reactive_ms"] = round(round_trip_ms(0, "reactive"), 2)
            times = [round_trip_ms(obs_id, "reactive") for obs_id in range(1, runs + 1)]
            result["reactive_ms_p50"] = round(statistics.median(times), 2)
            result["first_planning_ms"] = round(round_trip_ms(runs + 1, "planning"), 1)
            result["second_planning_ms"] = round(round_trip_ms(runs + 2, "planning"), 1)
            every = client.act(
                observation,
                instruction,
                obs_id=runs + 3,
                capture_time_ns=time.time_ns(),
                mode="planning",
                return_all_query_results=True,
                return_actions_by_depth=True,
            )  # every candidate's chunk at every depth comes back too
            chunks = every.candidate_actions_by_depth
            result["all_query_results"] = {
                "chosen_index": every.chosen_index,
                "candidate_actions_by_depth_shape": None if chunks is None else list(chunks.shape),
            }
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            result["exit_code"] = "killed after 60 s"
    warm_up = re.search(r"warm-up done in ([0-9.]+) s", log.read_text())
    return result | {"warm_up_s": float(warm_up.group(1)) if warm_up else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline-s", type=float, default=400.0)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU and tiny sizes: checks that every section runs")
    parser.add_argument("--only", help="comma-separated section names to run (default: all)")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    config, runs = ("tiny", 2) if args.smoke else ("predict2-2b", args.runs)
    report = Report(args.out, args.deadline_s, set(args.only.split(",")) if args.only else None)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        report.section("environment", lambda: environment(device))
        report.section("preprocess_exact", lambda: preprocess_exact(device))
        report.section("sampler_exact", lambda: sampler_exact(device))
        report.section("query_exact", lambda: query_exact(device, root))

        @functools.cache
        def model_files() -> CheckpointFiles:
            """The real-size models, written once, when a section first needs them (17 to 23 s on an H200 machine)."""
            started = time.perf_counter()
            files = write_random_assets(root / config, RandomAssetsSpec(config, "aloha", seed=0, dtype="bf16"))
            written_s = time.perf_counter() - started
            report.data["models"] = f"{config} DiT and its VAE, random weights (written in {written_s:.0f} s)"
            return files

        report.section("query_official", lambda: timed_queries(model_files(), device, runs, encode_full_sequence=True))
        report.section("query_fast_eager", lambda: timed_queries(model_files(), device, runs))
        report.section(
            "query_fast_compiled", lambda: timed_queries(model_files(), device, runs, compile_mode="default")
        )
        report.section(
            "query_fast_graphs",
            lambda: timed_queries(
                model_files(), device, runs, compile_mode="default", cuda_graphs=device.startswith("cuda")
            ),
        )
        report.section(
            "served_query", lambda: served_query(model_files(), device, runs, args.out.parent, report.left_s() - 60)
        )
        report.section("query_profile", lambda: query_profile(model_files(), device))
        report.section("planning_timing", lambda: planning_timing(device, model_files()))
        report.section("vae_variants", lambda: vae_variants(device, model_files(), runs))
        report.section(
            "query_fast_cuda_graphs", lambda: timed_queries(model_files(), device, runs, compile_mode="reduce-overhead")
        )
        report.section("attention_backends", lambda: attention_backends(device, config, runs))
        report.section("dit_variants", lambda: dit_variants(device, model_files(), config, runs))
        report.section("dit_attention_order", lambda: dit_attention_order(device, model_files(), config, runs))
        report.section(
            "dit_compile_scopes",
            lambda: dit_compiled(device, model_files(), config, runs, (("default", "blocks"), ("default", "model"))),
        )
        report.section(
            "dit_compile_modes",
            lambda: dit_compiled(
                device, model_files(), config, runs, (("default", "model"), ("max-autotune-no-cudagraphs", "model"))
            ),
        )
    report.print_table()
    if failed := report.failed():
        sys.exit(f"failed sections: {', '.join(failed)} (their errors are in {report.path})")


if __name__ == "__main__":
    main()
