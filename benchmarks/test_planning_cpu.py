"""Best-of-N planning on the CPU, pass after pass (the official order) against batched passes, in one run.

Random weights of the `small` DiT and the real-size Wan2.1 VAE, ALOHA layout, fp32 torch, one worker. The
configuration is the main one scaled down: best of 4, a 1-step action pass, world-model ensemble steps (1, 3), value
ensemble steps (1, 2, 3) for each predicted state: 15 DiT calls pass after pass, 7 batched.

    .venv/bin/python -m pytest benchmarks/test_planning_cpu.py --benchmark-enable --benchmark-json OUT.json
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest

from benchmarks.cpu_setup import aloha_query, machine_info
from cosmos_edge.runtime.bundle.loader import LoadedPolicies, load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.models.random_assets import RandomAssetsSpec, write_random_assets
from cosmos_edge.runtime.policy.planning import PlanningPolicy
from cosmos_edge.runtime.policy.planning_config import PlanningConfig

QUERY = aloha_query()
CONFIG = PlanningConfig(
    num_queries_best_of_n=4,
    num_denoising_steps_action=1,
    num_denoising_steps_future_state=3,
    num_future_state_predictions_in_ensemble=2,
    num_denoising_steps_value=3,
    num_value_predictions_in_ensemble=3,
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoadedPolicies]:
    files = write_random_assets(tmp_path_factory.mktemp("small"), RandomAssetsSpec("small", "aloha", seed=0))
    with load_policies(CheckpointSource(files), planning=CONFIG) as policies:
        yield policies


@pytest.mark.parametrize("batch_passes", [False, True], ids=["pass after pass", "batched"])
def test_best_of_4(benchmark, loaded: LoadedPolicies, batch_passes: bool) -> None:  # type: ignore[no-untyped-def]
    device_networks = list(loaded.device_networks)
    with contextlib.closing(
        PlanningPolicy(loaded.reactive.model, device_networks, CONFIG, batch_passes=batch_passes)
    ) as policy:
        warm = policy.infer(QUERY)  # binds the instruction
        assert warm.candidates is not None
        benchmark.extra_info.update(
            batch_passes=batch_passes,
            **machine_info(),
            precision="fp32",
            config="small DiT + Wan2.1 VAE, aloha, best of 4, action 1 step, world model (1, 3), value (1, 2, 3)",
            chosen=warm.candidates.chosen,
            values=[round(float(value), 6) for value in warm.candidates.values],
            stage_ms={name: round(ms, 1) for name, ms in warm.timings_ms.items()},
        )
        benchmark.pedantic(lambda: policy.infer(QUERY), rounds=2, warmup_rounds=0)


def test_best_of_4_within_a_deadline(benchmark, loaded: LoadedPolicies) -> None:  # type: ignore[no-untyped-def]
    """A deadline the configuration cannot meet: the answer time against the deadline (the overshoot is the DiT call
    in flight when it passed), and how the query ended."""
    deadline_ms = 15_000.0  # the encode alone takes about 11 s here, so planning gets about 4 s of the 50 it needs
    device_networks = list(loaded.device_networks)
    policy = PlanningPolicy(loaded.reactive.model, device_networks, CONFIG, batch_passes=False, deadline_ms=deadline_ms)
    with contextlib.closing(policy):
        policy.infer(QUERY)  # binds the instruction
        outcomes = []

        def answer() -> None:
            candidates = policy.infer(QUERY).candidates
            assert candidates is not None
            outcomes.append((candidates.outcome.value, int(np.isfinite(candidates.values).sum())))

        benchmark.pedantic(answer, rounds=2, warmup_rounds=0)
        benchmark.extra_info.update(
            deadline_ms=deadline_ms,
            overshoot_ms_max=round(benchmark.stats.stats.max * 1e3 - deadline_ms, 1),
            outcomes=outcomes,
            **machine_info(),
            config="small DiT + Wan2.1 VAE, aloha, fp32, best of 4 pass after pass (the CPU default)",
        )
