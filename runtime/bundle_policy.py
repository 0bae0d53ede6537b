"""A Cosmos Policy served from a bundle on an engine backend, without torch.

The reactive path encodes only the conditioning prefix (`vae_encoder_prefix`): the encoder is causal, so its
latents equal those of the whole sequence (tests/runtime/test_cosmos_policy.py). A query asking for future images
encodes the whole sequence and decodes it, which needs the bundle's `vae_encoder_full` and `vae_decoder`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from cosmos_edge.runtime.backends import Backend, backend_info, load_backend
from cosmos_edge.runtime.bundle import Bundle
from cosmos_edge.runtime.cosmos_policy import CosmosPolicy, PolicyOptions
from cosmos_edge.runtime.errors import BundleError
from cosmos_edge.runtime.graph_networks import GraphAutoencoder, GraphDenoisingNetwork
from cosmos_edge.runtime.graph_runner import GraphRunner

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleNetworks:
    """The engine-backed networks of one bundle; `close()` releases every session and device buffer."""

    autoencoder: GraphAutoencoder
    network: GraphDenoisingNetwork
    planning_network: GraphDenoisingNetwork | None

    def close(self) -> None:
        self.autoencoder.close()
        self.network.close()
        if self.planning_network is not None:
            self.planning_network.close()

    def __enter__(self) -> BundleNetworks:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def open_bundle_networks(
    bundle: Bundle,
    backend: Backend,
    device: str = "cpu",
    batch_sizes: Sequence[int] = (1,),
    future_images: bool | None = None,
    planning: bool = False,
) -> BundleNetworks:
    """Opens the graphs a policy needs. `future_images`: None loads the full encoder and decoder if the bundle
    has them, True requires them, False skips them. `planning` adds the planning DiT at the same batch sizes."""
    has_future = bool(bundle.graph_names("vae_encoder_full")) and bool(bundle.graph_names("vae_decoder"))
    if future_images and not has_future:
        raise BundleError(f"bundle {bundle.root}: has no future-image graphs (exported with --no-future-images)")
    load_future = has_future if future_images is None else future_images
    # Resolve every name first: a batch size the bundle lacks fails before any engine is loaded.
    dit_names = [bundle.dit_graph_name(batch) for batch in batch_sizes]
    planning_names = [bundle.dit_graph_name(batch, "planning_dit") for batch in batch_sizes] if planning else []
    with ExitStack() as opened:

        def open_graph(name: str) -> GraphRunner:
            runner = backend.open_graph(bundle, name, device)
            opened.callback(runner.close)  # closed again only if a later graph fails to open
            return runner

        encoders = [open_graph("vae_encoder_prefix")]
        decoder = None
        if load_future:
            encoders.append(open_graph("vae_encoder_full"))
            decoder = open_graph("vae_decoder")
        networks = BundleNetworks(
            autoencoder=GraphAutoencoder(encoders, decoder),
            network=GraphDenoisingNetwork([open_graph(name) for name in dit_names]),
            planning_network=GraphDenoisingNetwork([open_graph(name) for name in planning_names]) if planning else None,
        )
        opened.pop_all()
    return networks


def load_bundle_policy(
    bundle_dir: str | Path,
    backend: str = "onnxruntime",
    platform: str | None = None,
    *,
    device: str | None = None,
    batch_sizes: Sequence[int] = (1,),
    future_images: bool | None = None,
) -> CosmosPolicy:
    """The policy of a bundle on `backend` ("onnxruntime" or "tensorrt"), checked to be for `platform` if given.

    `device` defaults to the backend's ("cpu" for onnxruntime, "cuda" for tensorrt); `batch_sizes` and
    `future_images` are as in `open_bundle_networks`.

    Its engine resources (sessions, device buffers) live as long as the process: for one-shot use such as `act`.
    Servers that release them at a known time use `open_bundle_networks`, which returns closable networks.
    """
    bundle = Bundle.open(bundle_dir)
    bundle.check_platform(platform)
    engine = load_backend(backend)
    device = device or backend_info(backend).default_device
    networks = open_bundle_networks(bundle, engine, device, batch_sizes, future_images)
    _LOG.info(
        "serving bundle %s (%s, %s) on %s %s",
        bundle.root,
        bundle.manifest.platform.name,
        bundle.manifest.precision,
        backend,
        device,
    )
    return CosmosPolicy(
        platform=bundle.manifest.platform,
        stats=bundle.dataset_stats(),
        text_embeddings=bundle.text_embeddings(),
        autoencoder=networks.autoencoder,
        network=networks.network,
        options=PolicyOptions(encode_full_sequence=False),
    )
