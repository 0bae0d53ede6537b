"""A whole query through a tiny bundle on ONNX Runtime against the reference torch policy: same seed, same steps."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import subprocess
import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest

from cosmos_edge.runtime.bundle import loader
from cosmos_edge.runtime.bundle.loader import compiles_dit, load_policies, replays_cuda_graphs
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource
from cosmos_edge.runtime.engines import torch_networks
from cosmos_edge.runtime.engines.graph import dit_graph, text_kv_graph
from cosmos_edge.runtime.engines.graph_networks import GraphDenoisingNetwork, batch_slices
from cosmos_edge.runtime.engines.registry import load_graph_backend
from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.planning_config import PlanningConfig
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from tests.helpers.observations import TinyBundles, random_observation
from tests.helpers.policies import bundle_policy, reference_policy

# Max abs error of the normalised actions, fp32 bundle against the reference: measured 1.4e-7 to 2.8e-7
# (benchmarks/results/precision_error.json); each graph alone is held to 1e-4.
ACTION_TOL = 1e-5


def normalised_actions(stats: DatasetStats, actions: np.ndarray) -> np.ndarray:
    """Inverse of `unnormalize_actions`: back to the [-1, 1] units the model predicts in."""
    span = np.where(stats.actions_max > stats.actions_min, stats.actions_max - stats.actions_min, 1.0)
    return 2.0 * (actions - stats.actions_min) / span - 1.0


def action_error(stats: DatasetStats, got: ChunkResult, expected: ChunkResult) -> float:
    return float(np.abs(normalised_actions(stats, got.actions) - normalised_actions(stats, expected.actions)).max())


# Steps per platform: aloha runs the multi-step solver (3 network calls), the others the single call.
STEPS = {"libero": 1, "robocasa": 1, "aloha": 3}


def query(policy: ReactivePolicy, **overrides: object) -> ActionQuery:
    name = policy.platform.name
    base = ActionQuery(random_observation(name, seed=5), policy.instructions[0], seed=195, steps=STEPS[name])
    return dataclasses.replace(base, **overrides)


@pytest.fixture(scope="module")
def references(tiny_assets: dict[str, CheckpointFiles]) -> Callable[[str], tuple[DatasetStats, ChunkResult]]:
    """The reference policy's result for `query`, computed once per platform for every test here.

    ALOHA's reference encodes the whole sequence as the official code does; LIBERO's and RoboCasa's encode the
    conditioning prefix, which gives the same latents (tests/runtime/test_reactive.py) at half the cost.
    """
    cache: dict[str, tuple[DatasetStats, ChunkResult]] = {}

    def get(platform: str) -> tuple[DatasetStats, ChunkResult]:
        if platform not in cache:
            files = tiny_assets[platform]
            reference = reference_policy(files, encode_full_sequence=platform == "aloha")
            stats = DatasetStats.from_json(files.stats, reference.platform)
            cache[platform] = (stats, reference.infer(query(reference)))
        return cache[platform]

    return get


@pytest.mark.parametrize("platform", ["libero", "robocasa", "aloha"])
def test_bundle_query_matches_the_reference_policy(
    platform: str, tiny_bundles: TinyBundles, references: Callable[[str], tuple[DatasetStats, ChunkResult]]
) -> None:
    policy = bundle_policy(tiny_bundles(platform), "onnxruntime", platform)
    got = policy.infer(query(policy))
    stats, expected = references(platform)
    assert got.actions.shape == expected.actions.shape
    assert action_error(stats, got, expected) <= ACTION_TOL
    assert got.value == pytest.approx(expected.value, abs=ACTION_TOL)
    np.testing.assert_allclose(got.future_proprio, expected.future_proprio, rtol=0, atol=ACTION_TOL * 3)
    assert {"vae_encode", "dit", "readout"} <= set(got.timings_ms)


BF16_ACTION_TOL = 1e-2  # bf16 against the fp32 reference, normalised actions: measured 1.5e-3 to 5.1e-3 at tiny


@pytest.mark.parametrize("platform", ["libero", "robocasa", "aloha"])
def test_the_default_bf16_path_stays_within_its_tolerance_of_the_fp32_reference(
    platform: str,
    tiny_assets: dict[str, CheckpointFiles],
    references: Callable[[str], tuple[DatasetStats, ChunkResult]],
) -> None:
    # The torch backend's default precision on CUDA, here on the CPU (bf16 kernels differ there; the GPU check
    # gates the CUDA ones with the same bound).
    with load_policies(CheckpointSource(tiny_assets[platform], precision="bf16"), devices=["cpu"]) as loaded:
        got = loaded.reactive.infer(query(loaded.reactive))
    stats, expected = references(platform)
    assert 0 < action_error(stats, got, expected) <= BF16_ACTION_TOL
    assert got.value == pytest.approx(expected.value, abs=1e-3)


def test_batched_dit_graph_equals_one_call_per_candidate(tiny_bundles: TinyBundles) -> None:
    bundle = Bundle.open(tiny_bundles("aloha"))
    backend = load_graph_backend("onnxruntime")
    with contextlib.ExitStack() as runners:
        opened = [backend.open_graph(bundle.graph_file(name), "cpu") for name in ("dit_text_kv", "dit_b1", "dit_b2")]
        for runner in opened:
            runners.callback(runner.close)
        network = GraphDenoisingNetwork(opened[0], opened[1:]).bind_text(
            bundle.text_embeddings().get(bundle.text_embeddings().instructions[0])
        )
        rng = np.random.default_rng(0)
        x = rng.standard_normal((5, 16, 11, 28, 28)).astype(np.float32)
        timesteps = rng.uniform(0, 1, (5, 11)).astype(np.float32)
        mask = np.zeros((5, 1, 11, 28, 28), np.float32)
        batched = network(x, timesteps, mask)  # a batch of 5 runs as 2 + 2 + 1
        single = np.concatenate([network(x[i : i + 1], timesteps[i : i + 1], mask[i : i + 1]) for i in range(5)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)


TEXT_KV = (2, 1, 2, 4, 4)  # 2 blocks, 2 heads, 4 tokens, head dim 4


class TextKVRunner:
    """A text-K/V graph runner counting its runs; the keys are the embedding's sum, the values its negation."""

    def __init__(self) -> None:
        self.spec = text_kv_graph(4, 8, TEXT_KV)
        self.runs = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        total = np.full(TEXT_KV, feeds["text_embedding"].sum(), np.float32)
        return {"text_k": total, "text_v": -total}


class HeldRunner:
    """A DiT graph runner that holds its first run until released and counts runs in progress."""

    def __init__(self) -> None:
        self.spec = dit_graph(platform_spec("aloha"), 1, TEXT_KV)
        self.inside, self.second, self.release = threading.Event(), threading.Event(), threading.Event()
        self.running = self.most_running = 0

    def set_constant_input(self, name: str, array: np.ndarray) -> None:
        pass

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        (self.second if self.inside.is_set() else self.inside).set()
        assert self.release.wait(timeout=30)
        self.running -= 1
        return {"velocity": np.zeros_like(feeds["x"])}

    def close(self) -> None:
        pass


def test_a_graph_dit_runs_one_call_at_a_time() -> None:
    # A planning worker stopped by its deadline may still be in its last call when the next query starts.
    runner = HeldRunner()
    network = GraphDenoisingNetwork(TextKVRunner(), [runner]).bind_text(np.zeros((1, 4, 8), np.float32))  # type: ignore[arg-type, list-item]
    inputs = [spec.zeros() for spec in runner.spec.inputs[:3]]
    calling = threading.Event()

    def second_call() -> None:
        calling.set()
        network(*inputs)

    calls = [threading.Thread(target=network, args=inputs), threading.Thread(target=second_call)]
    calls[0].start()
    assert runner.inside.wait(timeout=30)
    calls[1].start()
    assert calling.wait(timeout=30)  # the second call is under way: unheld, it would enter in microseconds
    assert not runner.second.wait(timeout=0.5)  # it waits for the first
    runner.release.set()
    for call in calls:
        call.join(timeout=30)
    assert runner.most_running == 1 and not any(call.is_alive() for call in calls)


class CountingRunner(HeldRunner):
    """Runs at once and records the constant inputs uploaded."""

    def __init__(self, batch: int = 1) -> None:
        super().__init__()
        self.spec = dit_graph(platform_spec("aloha"), batch, TEXT_KV)
        self.release.set()
        self.uploads: list[tuple[str, float]] = []

    def set_constant_input(self, name: str, array: np.ndarray) -> None:
        self.uploads.append((name, float(array.flat[0])))


def test_the_keys_and_values_of_an_instruction_are_computed_and_uploaded_once_whichever_binding_calls() -> None:
    text_kv, runners = TextKVRunner(), [CountingRunner(1), CountingRunner(2)]
    network = GraphDenoisingNetwork(text_kv, runners)  # type: ignore[arg-type, list-item]
    inputs = [spec.zeros() for spec in runners[0].spec.inputs[:3]]
    embedding = np.full((1, 4, 8), 0.5, np.float32)
    policy, planner = network.bind_text(embedding), network.bind_text(embedding.copy())  # one instruction, twice
    assert text_kv.runs == 1  # at binding, where a query times its text conditioning, not in its first DiT call
    for _ in range(3):
        policy(*inputs)
        planner(*inputs)
    # Every batch size's graph holds them after the first call: a batch of 2 later uploads nothing.
    assert text_kv.runs == 1 and all(runner.uploads == [("text_k", 16.0), ("text_v", -16.0)] for runner in runners)
    network.bind_text(embedding + 1)(*inputs)  # another instruction
    policy(*inputs)
    assert text_kv.runs == 3 and runners[1].uploads[-2:] == [("text_k", 16.0), ("text_v", -16.0)]


def test_dit_graphs_must_take_the_text_kv_graph_outputs() -> None:
    other = CountingRunner()
    other.spec = dit_graph(platform_spec("aloha"), 1, (2, 1, 2, 5, 4))  # 5 tokens, the text-K/V graph gives 4
    with pytest.raises(EngineError, match=r"taking the dit_text_kv outputs .* as its inputs 4 and 5"):
        GraphDenoisingNetwork(TextKVRunner(), [other])  # type: ignore[arg-type, list-item]


def test_batches_of_any_size_run_as_slices_of_the_loaded_sizes() -> None:
    assert batch_slices(2, [1, 2]) == [(0, 2)]
    assert batch_slices(7, [1, 2, 4]) == [(0, 4), (4, 6), (6, 7)]
    assert batch_slices(5, [1, 4]) == [(0, 4), (4, 5)]


def test_dit_graphs_without_batch_1_are_refused() -> None:
    with pytest.raises(EngineError, match=r"DiT graphs: expected batch 1 among them, got batches \[2\]"):
        GraphDenoisingNetwork(TextKVRunner(), [CountingRunner(2)])  # type: ignore[arg-type, list-item]


def test_half_precision_bundle_stays_close(
    tiny_bundles: TinyBundles, references: Callable[[str], tuple[DatasetStats, ChunkResult]]
) -> None:
    # fp16 runs on onnxruntime's CPU provider (bf16 does not; benchmarks/precision_error.py measures both).
    policy = bundle_policy(tiny_bundles("aloha", "fp16"))
    stats, expected = references("aloha")
    assert 0 < action_error(stats, policy.infer(query(policy)), expected) <= 5e-3  # measured 5.2e-4


@pytest.mark.slow
def test_future_images_match_the_reference(tiny_bundles: TinyBundles, tiny_assets: dict[str, CheckpointFiles]) -> None:
    policy = bundle_policy(tiny_bundles("aloha", future_images=True), future_images=True)
    reference = reference_policy(tiny_assets["aloha"])
    got = policy.infer(query(policy, return_future_images=True, steps=1))
    expected = reference.infer(query(reference, return_future_images=True, steps=1))
    stats = DatasetStats.from_json(tiny_assets["aloha"].stats, reference.platform)
    assert action_error(stats, got, expected) <= ACTION_TOL
    assert got.future_images is not None and expected.future_images is not None
    for camera, image in expected.future_images.items():
        # uint8 pixels: fp32 differences only flip values sitting on a rounding boundary, by one level.
        assert np.abs(got.future_images[camera].astype(int) - image).max() <= 1, camera


SERVE_WITHOUT_TORCH = """
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: serving a bundle must not import torch")

sys.meta_path.insert(0, BlockTorch())
import numpy as np
from cosmos_edge.runtime.bundle import loader
from cosmos_edge.runtime.bundle.loader import load_policies, replays_cuda_graphs
from cosmos_edge.runtime.bundle.sources import BundleSource
from cosmos_edge.runtime.policy.api import ActionQuery, Observation

from cosmos_edge.cli import main, serve_cmd  # what `cosmos-edge serve --bundle` imports
from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.server import PolicyServer, serving_in_thread

loaded = load_policies(BundleSource(sys.argv[1], "onnxruntime"))
policy = loaded.reactive
rng = np.random.default_rng(0)
images = {name: rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for name in policy.platform.cameras}
observation = Observation(images, np.zeros(policy.platform.proprio_dim, np.float32))
result = policy.infer(ActionQuery(observation, policy.instructions[0], seed=1, steps=1))
assert np.isfinite(result.actions).all()
wire = Observation({name: image[:224, :224] for name, image in images.items()}, observation.proprio)
server = PolicyServer(loaded.modes(), ServerConfig("tcp://127.0.0.1:*"))
with serving_in_thread(server) as endpoint, PolicyClient(endpoint, timeout_s=60) as client:
    reply = client.act(wire, policy.instructions[0], obs_id=1, capture_time_ns=1, seed=1, steps=1)
assert np.isfinite(reply.actions).all()
assert not any(name == "torch" or name.startswith("torch.") for name in sys.modules), "torch was imported"
loaded.close()
print("served without torch")
"""


def test_serving_a_bundle_never_imports_torch(tiny_bundles: TinyBundles) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(tiny_bundles("libero"))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and "served without torch" in result.stdout, result.stderr


def test_one_dit_and_one_vae_per_device_without_a_planning_model(tiny_assets: dict[str, CheckpointFiles]) -> None:
    files = tiny_assets["aloha"]
    planning = PlanningConfig(num_queries_best_of_n=2)
    with load_policies(CheckpointSource(files), devices=["cpu", "cpu"], planning=planning) as loaded:
        assert len(loaded.device_networks) == 2 and loaded.device_networks[0] is not loaded.device_networks[1]
        assert all(device.planning_network is device.policy_network for device in loaded.device_networks)
    separate = CheckpointSource(files, planning_checkpoint=tiny_assets["libero"].checkpoint)
    with load_policies(separate, planning=planning) as loaded:
        (device,) = loaded.device_networks
        assert device.planning_network is not device.policy_network
    # The policy's checkpoint given as the planning one, spelled another way: still the same DiT, loaded once.
    spelled = files.checkpoint.parent / ".." / files.checkpoint.parent.name / files.checkpoint.name
    with load_policies(CheckpointSource(files, planning_checkpoint=spelled), planning=planning) as loaded:
        (device,) = loaded.device_networks
        assert device.planning_network is device.policy_network


def test_reactive_only_loads_the_first_device(tiny_assets: dict[str, CheckpointFiles]) -> None:
    with load_policies(CheckpointSource(tiny_assets["aloha"]), devices=["cpu", "cpu"]) as loaded:
        assert loaded.planning is None and len(loaded.device_networks) == 1 and set(loaded.modes()) == {"reactive"}


def test_closing_a_bundle_closes_its_runners(tiny_bundles: TinyBundles) -> None:
    loaded = load_policies(BundleSource(tiny_bundles("aloha")), planning=PlanningConfig(num_queries_best_of_n=2))
    policy = loaded.reactive
    query = ActionQuery(random_observation("aloha"), policy.instructions[0], seed=1, steps=1)
    policy.infer(query)
    loaded.close()
    with pytest.raises(EngineError, match="after close"):
        policy.infer(query)


def test_closing_checkpoint_policies_frees_their_networks(tiny_assets: dict[str, CheckpointFiles]) -> None:
    loaded = load_policies(CheckpointSource(tiny_assets["aloha"]), planning=PlanningConfig(num_queries_best_of_n=2))
    policy, (device,) = loaded.reactive, loaded.device_networks
    query = ActionQuery(random_observation("aloha"), policy.instructions[0], seed=1, steps=1)
    policy.infer(query)
    dit = device.policy_network._dit  # type: ignore[attr-defined]
    assert dit.rope._cache and device.policy_network.arrays._cached  # type: ignore[attr-defined]
    loaded.close()
    assert all(weight.is_meta for weight in dit.parameters())  # the storage is released, not only the references
    assert not dit.rope._cache and not device.policy_network.arrays._cached  # type: ignore[attr-defined]
    with pytest.raises(EngineError, match="closed with the policies that loaded it"):
        policy.infer(query)


def test_warm_up_runs_one_query_before_the_first_request(tiny_assets: dict[str, CheckpointFiles]) -> None:
    with load_policies(CheckpointSource(tiny_assets["aloha"])) as loaded:
        assert loaded.warm_up() > 0
        query = ActionQuery(random_observation("aloha"), loaded.reactive.instructions[1], seed=3, steps=1)
        assert loaded.reactive.infer(query).actions.shape == (50, 14)


def warm_up_steps(files: CheckpointFiles, replays: bool, monkeypatch: pytest.MonkeyPatch) -> list[int | None]:
    """The steps of the warm-up's reactive query, with `replays_cuda_graphs` saying `replays` (a CUDA device's
    case, on the CPU)."""
    monkeypatch.setattr(loader, "replays_cuda_graphs", lambda source: replays)
    with load_policies(CheckpointSource(files)) as loaded:
        asked: list[int | None] = []
        infer = loaded.reactive.infer
        monkeypatch.setattr(loaded.reactive, "infer", lambda query: asked.append(query.steps) or infer(query))
        loaded.warm_up()
    return asked


def test_a_dit_that_replays_cuda_graphs_is_warmed_up_with_the_default_steps(
    tiny_assets: dict[str, CheckpointFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each step's timesteps are captured on their first call: warmed up with 1 step, a first request with the
    # default 10 would capture 9 graphs.
    files = tiny_assets["aloha"]
    assert replays_cuda_graphs(CheckpointSource(files, cuda_graphs=True))
    assert not replays_cuda_graphs(CheckpointSource(files))
    assert warm_up_steps(files, True, monkeypatch) == [platform_spec("aloha").default_action_steps]
    assert warm_up_steps(files, False, monkeypatch) == [1]


@pytest.mark.parametrize(
    ("compiled", "replays", "scores_one"), [(False, False, False), (True, False, True), (False, True, True)]
)
def test_a_compiled_dit_has_each_planning_worker_score_one_candidate_in_the_warm_up(
    tiny_assets: dict[str, CheckpointFiles],
    monkeypatch: pytest.MonkeyPatch,
    compiled: bool,
    replays: bool,
    scores_one: bool,
) -> None:
    # Measured on an H200: a compiled 2B DiT's first batch-1 planning call (a deadline's base action pass) compiled
    # for 43 s in the query; the warm-up's candidate compiles it before serving.
    files = tiny_assets["aloha"]
    assert compiles_dit(CheckpointSource(files, compile_mode="default")) and not compiles_dit(CheckpointSource(files))
    monkeypatch.setattr(loader, "compiles_dit", lambda source: compiled)
    monkeypatch.setattr(loader, "replays_cuda_graphs", lambda source: replays)
    with load_policies(CheckpointSource(files), planning=PlanningConfig(num_queries_best_of_n=2)) as loaded:
        assert loaded.planning is not None
        observations: list[object] = []
        warm_up = loaded.planning.warm_up
        monkeypatch.setattr(
            loaded.planning, "warm_up", lambda observation: observations.append(observation) or warm_up(observation)
        )
        loaded.warm_up()
    assert len(observations) == 1 and (observations[0] is not None) == scores_one


def test_cuda_graphs_on_a_cpu_device_are_refused_before_any_weights_are_read(
    tiny_assets: dict[str, CheckpointFiles], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A source made for CUDA (CheckpointSource.for_devices) loaded without its devices would default to the CPU.
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights read before the devices were checked")

    monkeypatch.setattr(torch_networks, "load_wan_vae", no_loading)
    with pytest.raises(ConfigError, match=r"cuda_graphs: CUDA graphs need CUDA devices; got \['cpu'\]"):
        load_policies(CheckpointSource(tiny_assets["aloha"], cuda_graphs=True))


def test_fp16_on_the_cpu_is_warned_of(
    tiny_assets: dict[str, CheckpointFiles], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.bundle.loader"):
        load_policies(CheckpointSource(tiny_assets["aloha"], precision="fp16")).close()
        assert "fp16 on the CPU: torch's fp16 kernels run far slower than fp32" in caplog.text
        caplog.clear()
        load_policies(CheckpointSource(tiny_assets["aloha"], precision="bf16")).close()
        assert not caplog.text
