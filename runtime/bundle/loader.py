"""The one place where a bundle or official checkpoint files become policies, and the owner of what they hold.

`load_policies` opens the networks of every device once: the reactive policy runs on the first device, the planning
policy on all of them, and both share one VAE (on the first device) and, without a separate planning model, one DiT
per device. The
returned `LoadedPolicies` owns every network, engine session, device buffer and the planning thread pool, and
releases them on `close()` (or at the end of a `with` block): torch networks free their weights, bound instructions
and CUDA graphs, and the policies fail clearly if asked again.

Backends are imported by name (`engines.registry`), so loading a bundle never imports torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from types import TracebackType

import numpy as np

from cosmos_edge.runtime.bundle.manifest import MANIFEST_NAME
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource, ModelSource
from cosmos_edge.runtime.engines.graph import GraphRunner, SignatureMismatch
from cosmos_edge.runtime.engines.graph_networks import GraphAutoencoder, GraphConditioning, GraphDenoisingNetwork
from cosmos_edge.runtime.engines.registry import backend_info, load_graph_backend, load_torch_backend
from cosmos_edge.runtime.errors import BundleError, ConfigError
from cosmos_edge.runtime.files import same_file
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec, platform_spec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.api import (
    ActionQuery,
    Observation,
    Policy,
)
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.planning import DeviceNetworks, PlanningPolicy, planning_batch_sizes
from cosmos_edge.runtime.policy.planning_config import COUNT_LIMITS, PlanningConfig
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from cosmos_edge.runtime.policy.steps import PolicyModel
from cosmos_edge.runtime.precision import check_cuda_graph_devices

_LOG = logging.getLogger(__name__)


class LoadedPolicies:
    """The policies of one process and everything they hold; use as a context manager or call `close()`."""

    def __init__(
        self,
        reactive: ReactivePolicy,
        planning: PlanningPolicy | None,
        device_networks: Sequence[DeviceNetworks],
        resources: ExitStack,
        replays_graphs: bool,
        compiled: bool,
    ) -> None:
        self.reactive = reactive
        self.planning = planning
        # The DiTs of each device, in device order (the VAE lives on the first).
        self.device_networks = tuple(device_networks)
        self._resources = resources
        self._replays_graphs = replays_graphs
        self._compiled = compiled

    def warm_up(self) -> float:
        """One reactive query on a black observation, and the planning networks' batched call, so that kernel
        selection and compilation (minutes for a compiled 2B DiT) happen before the first real request. A DiT that
        replays CUDA graphs captures one per timesteps: the query then takes the platform's default steps (and seed),
        so that a first request with them replays every call (with `use_variance_scale` another seed has other
        timesteps). A compiled DiT, or one that replays graphs, also has each planning
        worker score one candidate (`PlanningPolicy.warm_up`): the batch-1 graphs of the planning model and of every
        device, which a deadline's query or a one-candidate share would otherwise compile (tens of seconds at 2B).
        Returns its seconds."""
        policy, started = self.reactive, time.perf_counter()
        platform = policy.platform
        images = {name: np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) for name in platform.cameras}
        observation = Observation(images, (policy.model.stats.proprio_min + policy.model.stats.proprio_max) / 2)
        steps = platform.default_action_steps if self._replays_graphs else 1
        policy.infer(ActionQuery(observation, policy.instructions[0], steps=steps))
        policy.reset()  # the next query binds its own instruction
        if self.planning is not None:
            self.planning.warm_up(observation if self._replays_graphs or self._compiled else None)
        return time.perf_counter() - started

    def modes(self) -> dict[str, Policy]:
        """Mode name → policy, as the server serves them."""
        return {"reactive": self.reactive} | ({"planning": self.planning} if self.planning is not None else {})

    def close(self) -> None:
        self._resources.close()

    def __enter__(self) -> LoadedPolicies:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def load_policies(
    source: ModelSource,
    *,
    devices: Sequence[str] | None = None,
    planning: PlanningConfig | None = None,
    planning_deadline_ms: float | None = None,
    future_images: bool | None = None,
    use_variance_scale: bool = False,
) -> LoadedPolicies:
    """The reactive policy, and with `planning` the best-of-N policy over `devices` (default: the backend's one),
    answering within `planning_deadline_ms` when given (`PlanningPolicy`); both sample with the official
    `use_variance_scale` when it is on.

    `future_images` (bundles): None loads the full encoder and decoder if the bundle has them, True requires them,
    False skips them. Checkpoint files always can decode future images.
    """
    chosen = list(devices or [_default_device(source)])
    used = chosen if planning is not None else chosen[:1]  # the reactive mode runs on the first device only
    resources = ExitStack()  # handed to LoadedPolicies on success, unwound here on any failure
    try:
        if isinstance(source, CheckpointSource):
            model, networks = _open_checkpoints(source, used, planning is not None, resources)
            full_sequence = source.encode_full_sequence
        else:
            one_at_a_time = planning_deadline_ms is not None
            model, networks = _open_bundle(source, used, planning, one_at_a_time, future_images, resources)
            full_sequence = False
        reactive = ReactivePolicy(
            model,
            networks[0].policy_network,
            encode_full_sequence=full_sequence,
            use_variance_scale=use_variance_scale,
        )
        resources.callback(reactive.reset)  # drops its bound instruction (K/V, graphs) before the networks close
        planner = None
        if planning is not None:
            planner = PlanningPolicy(
                model,
                networks,
                planning,
                batch_passes=_batching_pays(used),
                deadline_ms=planning_deadline_ms,
                encode_full_sequence=full_sequence,
                use_variance_scale=use_variance_scale,
            )
            resources.callback(planner.close)
            resources.callback(planner.reset)
    except BaseException:
        resources.close()
        raise
    return LoadedPolicies(reactive, planner, networks, resources, replays_cuda_graphs(source), compiles_dit(source))


def replays_cuda_graphs(source: ModelSource) -> bool:
    """Whether `source`'s DiT replays batch-1 calls from CUDA graphs, each captured on the first call of its
    timesteps (what the warm-up prepares)."""
    return isinstance(source, CheckpointSource) and source.cuda_graphs


def compiles_dit(source: ModelSource) -> bool:
    """Whether `source`'s DiT compiles its graphs on their first call (batch 1 apart from larger batches)."""
    return isinstance(source, CheckpointSource) and source.compile_mode is not None


def planning_candidates(
    source: ModelSource,
    devices: Sequence[str] | None,
    requested: int | None,
    default: int,
    *,
    one_at_a_time: bool = False,
) -> int | None:
    """How many best-of-N candidates `source` can plan with over `devices` (None: reactive only).

    Checkpoint files plan with any number (`requested`, or `default`), and so does a bundle whose candidates are
    scored `one_at_a_time` (under a planning deadline: batch 1, which every bundle has). Otherwise a bundle has DiT
    graphs for fixed batch sizes, and the candidates split over the devices must fit them: a requested number that
    does not fit is refused, naming the batch sizes; without one, the most candidates up to `default` that fit are
    used, and none below min(2, default) (planning over one candidate of several would only repeat the reactive
    chunk).
    """
    if requested is not None and requested < 1:
        raise ConfigError(f"num_queries_best_of_n: expected at least 1, got {requested}")
    if isinstance(source, CheckpointSource) or one_at_a_time:
        return default if requested is None else requested
    fits = _fitting(source, devices)
    if requested is not None:
        if not fits(requested):
            available, workers = set(bundle_batch_sizes(source)), len(devices or [_default_device(source)])
            needed = sorted(set(planning_batch_sizes(requested, workers)) - available)
            counts = candidates_that_fit(source, devices)
            fitting = f"ask for {' or '.join(map(str, counts[:3]))} candidates, " if counts else ""
            raise ConfigError(
                f"num_queries_best_of_n: {requested} candidates over {workers} device(s) need DiT batch sizes "
                f"{needed}, which bundle {source.path} lacks (it has {sorted(available)}); {fitting}plan under a "
                "deadline (candidates then run one at a time, at batch 1), or re-export the bundle with those batch "
                "sizes"
            )
        return requested
    return next((n for n in range(default, min(2, default) - 1, -1) if fits(n)), None)


def candidates_that_fit(source: BundleSource, devices: Sequence[str] | None) -> list[int]:
    """Every number of candidates from 2 up to the planning limit whose split over `devices` fits the bundle's DiT
    batch sizes (what `--num-candidates` may ask for without a deadline)."""
    fits = _fitting(source, devices)
    return [n for n in range(2, COUNT_LIMITS["num_queries_best_of_n"] + 1) if fits(n)]


def _fitting(source: BundleSource, devices: Sequence[str] | None) -> Callable[[int], bool]:
    available = set(bundle_batch_sizes(source))
    workers = len(devices or [_default_device(source)])
    return lambda candidates: set(planning_batch_sizes(candidates, workers)) <= available


def source_platform(source: ModelSource) -> PlatformSpec:
    """The platform `source` serves, read without loading a model (a bundle's manifest, or the files' --platform)."""
    if isinstance(source, CheckpointSource):
        return platform_spec(source.files.platform)
    return source.bundle.manifest.platform


def source_stats(source: ModelSource) -> DatasetStats:
    """The dataset statistics `source` normalises with, read without loading a model."""
    if isinstance(source, CheckpointSource):
        return DatasetStats.from_json(source.files.stats, source_platform(source))
    return source.bundle.dataset_stats()


def source_text_embeddings(source: ModelSource) -> text_store.TextEmbeddings:
    """The instruction embeddings `source` serves, read without loading a model."""
    if isinstance(source, CheckpointSource):
        return text_store.read(source.files.text_embeddings)
    return source.bundle.text_embeddings()


def bundle_batch_sizes(source: BundleSource) -> list[int]:
    """The DiT batch sizes a bundle has graphs for, sorted."""
    bundle = source.bundle
    return sorted({bundle.manifest.graphs[name].batch for name in bundle.graph_names("dit")})


def _batching_pays(devices: Sequence[str]) -> bool:
    """Whether planning batches independent passes: on accelerators, where a larger batch fills the device; not on
    the CPU, where a DiT call costs more per sample in a larger batch (`small`, 2 cores: 0.61 s at batch 1, 0.78 s
    at 8 and above; benchmarks/results/cpu_planning.json measures best-of-4 10% slower batched)."""
    return not all(device == "cpu" for device in devices)


def _default_device(source: ModelSource) -> str:
    if isinstance(source, CheckpointSource):
        return load_torch_backend().default_device()
    return backend_info(source.backend).default_device


def _open_checkpoints(
    source: CheckpointSource, devices: list[str], with_planning: bool, resources: ExitStack
) -> tuple[PolicyModel, list[DeviceNetworks]]:
    files = source.files
    platform = platform_spec(files.platform)
    stats = source_stats(source)
    text = text_store.read(files.text_embeddings)
    torch_backend = load_torch_backend()
    for device in devices:  # every device is checked before any weights are read
        torch_backend.check_device(device)
    if source.cuda_graphs:
        check_cuda_graph_devices(devices)
    if source.precision == "fp16" and any(device.partition(":")[0] == "cpu" for device in devices):
        _LOG.warning("fp16 on the CPU: torch's fp16 kernels run far slower than fp32 there; fp32 or bf16 run faster")
    # The DiT is loaded once and shared unless another planning checkpoint is given (a second copy of the 2B model
    # is about 4 GB per device), however its path is spelled.
    separate_planner = (
        with_planning
        and source.planning_checkpoint is not None
        and not same_file(source.planning_checkpoint, files.checkpoint)
    )
    _LOG.info("loading %s (%s) on %s", files.tokenizer, source.precision, devices[0])
    autoencoder = torch_backend.open_autoencoder(
        files.tokenizer, source.precision, devices[0], platform, source.compile_mode, source.cuda_graphs
    )
    resources.callback(autoencoder.close)
    networks = []
    for device in devices:
        _LOG.info("loading %s (%s) on %s", files.checkpoint, source.precision, device)
        compile_args = (source.compile_mode, source.compile_scope, source.cuda_graphs)
        started = time.perf_counter()
        policy_network = torch_backend.open_dit(files.checkpoint, source.precision, device, *compile_args)
        resources.callback(policy_network.close)
        _LOG.info("loaded %s in %.1f s", files.checkpoint, time.perf_counter() - started)
        text_store.check_fits_dit(
            text, f"text embeddings {files.text_embeddings}", files.checkpoint, policy_network.text_dim
        )
        planning_network = policy_network
        if separate_planner and source.planning_checkpoint is not None:
            _LOG.info("loading the planning model %s on %s", source.planning_checkpoint, device)
            planning_network = torch_backend.open_dit(
                source.planning_checkpoint, source.precision, device, *compile_args
            )
            resources.callback(planning_network.close)
            text_store.check_fits_dit(
                text, f"text embeddings {files.text_embeddings}", source.planning_checkpoint, planning_network.text_dim
            )
        networks.append(DeviceNetworks(policy_network, planning_network))
    return PolicyModel(platform, stats, text, autoencoder, autoencoder), networks


def _open_bundle(
    source: BundleSource,
    devices: list[str],
    planning: PlanningConfig | None,
    one_at_a_time: bool,
    future_images: bool | None,
    resources: ExitStack,
) -> tuple[PolicyModel, list[DeviceNetworks]]:
    bundle = source.bundle
    backend = load_graph_backend(source.backend)
    has_future = bool(bundle.graph_names("vae_encoder_full")) and bool(bundle.graph_names("vae_decoder"))
    if future_images and not has_future:
        raise BundleError(f"bundle {bundle.root}: has no future-image graphs (exported with --no-future-images)")
    load_future = has_future if future_images is None else future_images
    # Under a planning deadline candidates are scored one at a time: batch 1 (larger batches of ensemble members run
    # as slices of it).
    batches: tuple[int, ...] = (1,)
    if planning is not None and not one_at_a_time:
        batches = planning_batch_sizes(planning.num_queries_best_of_n, len(devices))
    for device in devices:  # a device that cannot run the bundle is refused before gigabytes are hashed and loaded
        backend.check_target(device, bundle.manifest.precision)
    # Resolve every name first: a batch size the bundle lacks fails before any engine is loaded.
    roles = ("dit", "planning_dit") if planning is not None and bundle.graph_names("planning_dit") else ("dit",)
    names = {
        role: (bundle.text_kv_graph_name(role), [bundle.dit_graph_name(b, role) for b in batches]) for role in roles
    }

    def open_graph(name: str, device: str) -> GraphRunner:
        _LOG.info(
            "loading graph %s of %s on %s (its files checked against the manifest first)", name, bundle.root, device
        )
        try:
            runner = backend.open_graph(bundle.graph_file(name, with_engine=source.backend == "tensorrt"), device)
        except SignatureMismatch as error:  # the manifest and the file disagree: the bundle's fault, as a hash would be
            raise BundleError(
                f"{bundle.root / MANIFEST_NAME}: graph {name!r} is not the file's graph: {error}"
            ) from None
        resources.callback(runner.close)
        return runner

    # The first device holds the VAE graphs; the conditioning encoder is opened first, as the cheapest check.
    cameras_encoder = open_graph("vae_encoder_cameras", devices[0])
    encoder = open_graph("vae_encoder_full", devices[0]) if load_future else None
    decoder = open_graph("vae_decoder", devices[0]) if load_future else None

    def open_network(role: str, device: str) -> GraphDenoisingNetwork:
        text_kv, dits = names[role]
        return GraphDenoisingNetwork(open_graph(text_kv, device), [open_graph(name, device) for name in dits])

    networks = []
    for device in devices:
        policy_network = open_network("dit", device)
        planner = open_network("planning_dit", device) if "planning_dit" in names else policy_network
        networks.append(DeviceNetworks(policy_network, planner))
    manifest = bundle.manifest
    _LOG.info(
        "loaded bundle %s (%s, %s) on %s %s",
        bundle.root,
        manifest.platform.name,
        manifest.precision,
        source.backend,
        ", ".join(devices),
    )
    conditioning = GraphConditioning(manifest.platform, cameras_encoder)
    autoencoder = GraphAutoencoder(encoder, decoder)
    model = PolicyModel(manifest.platform, bundle.dataset_stats(), bundle.text_embeddings(), autoencoder, conditioning)
    return model, networks
