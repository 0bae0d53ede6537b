"""One reactive query on the CPU: the official whole-sequence path against the default fast path, in one run.

Random weights of the `small` DiT and the real-size Wan2.1 VAE, ALOHA layout, fp32 torch, 1 denoising step, three
480×640 camera frames. The reference (`act --reference`) runs the official image transforms in numpy/Pillow and
encodes all 41 pixel frames; the default path runs the same transforms (on the CPU, Pillow's C resize beats the
tensor ops the GPU runs) and encodes only the 12 camera frames after the black frames it encoded once at load (both
bind the instruction once).

    .venv/bin/python -m pytest benchmarks/test_query_cpu.py --benchmark-enable --benchmark-json OUT.json
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from benchmarks.cpu_setup import aloha_query, machine_info
from cosmos_edge.runtime.bundle.loader import LoadedPolicies, load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets

QUERY = aloha_query(steps=1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> CheckpointSource:
    files = write_random_assets(tmp_path_factory.mktemp("small"), RandomAssetsSpec("small", "aloha", seed=0))
    return CheckpointSource(files)


@pytest.fixture(scope="module", params=["reference", "fast"])
def loaded(request: pytest.FixtureRequest, assets: CheckpointSource) -> Iterator[tuple[str, LoadedPolicies]]:
    source = CheckpointSource(assets.files, encode_full_sequence=request.param == "reference")
    with load_policies(source) as policies:
        yield request.param, policies


def test_one_step_query(benchmark, loaded: tuple[str, LoadedPolicies]) -> None:  # type: ignore[no-untyped-def]
    path, policies = loaded
    policy = policies.reactive
    warm = policy.infer(QUERY)  # binds the instruction
    benchmark.extra_info.update(
        path=path,
        **machine_info(),
        precision="fp32",
        config="small DiT + Wan2.1 VAE, aloha, 1 step",
        stage_ms={name: round(ms, 1) for name, ms in warm.timings_ms.items()},
    )
    benchmark.pedantic(lambda: policy.infer(QUERY), rounds=3, warmup_rounds=0)
