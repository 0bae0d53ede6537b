"""The semantic steps of one Cosmos Policy query, each written once: `reactive` and `planning` compose them.

encode an observation → sample latents in a conditioning mode → read the chunk and the value (→ decode future
images). Official sources: `cosmos_utils.get_action` (encode, sample, read), `get_future_images_from_generated_samples`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime.errors import InputError, NonFiniteOutput
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy import latents
from cosmos_edge.runtime.policy.api import (
    MAX_DENOISING_STEPS,
    ActionQuery,
    ConditioningEncoder,
    DenoisingNetwork,
    DeviceNetwork,
    NetworkFn,
    Observation,
    StageTimer,
    VideoAutoencoder,
)
from cosmos_edge.runtime.policy.arrays import HOST_ARRAYS, ArrayOps
from cosmos_edge.runtime.policy.conditioning import ConditioningMode, condition_mask, placeholder_restore_slots
from cosmos_edge.runtime.policy.images import preprocess_observation_images
from cosmos_edge.runtime.policy.normalization import PROPRIO_WARN, DatasetStats
from cosmos_edge.runtime.policy.sampler import Denoiser, sample
from cosmos_edge.runtime.policy.text_embeddings import TextEmbeddings

_LOG = logging.getLogger(__name__)

# (platform, dimension) pairs already warned about: a unit mistake repeats in every query, one line says it.
_proprio_warned: set[tuple[str, int]] = set()


@dataclass(frozen=True, eq=False)
class PolicyModel:
    """What every query of one policy reads besides the DiT: platform, statistics, instruction embeddings, the VAE,
    and the encoder of the conditioning prefix (the backend's: each encodes the black frames once)."""

    platform: PlatformSpec
    stats: DatasetStats
    text_embeddings: TextEmbeddings
    autoencoder: VideoAutoencoder
    conditioning: ConditioningEncoder

    def __post_init__(self) -> None:
        self.stats.check_platform(self.platform, "stats")  # a model assembled from files of two platforms


class ModelPolicy:
    """What every policy over a `PolicyModel` answers from it (`Policy.platform`, `Policy.instructions`)."""

    _model: PolicyModel

    @property
    def model(self) -> PolicyModel:
        return self._model

    @property
    def platform(self) -> PlatformSpec:
        return self._model.platform

    @property
    def instructions(self) -> tuple[str, ...]:
        return self._model.text_embeddings.instructions


@dataclass(frozen=True)
class EncodedObservation:
    """`placeholder` is the pre-injection VAE latent (for future-image decoding); `clean` the conditioning latent."""

    placeholder: np.ndarray
    clean: np.ndarray


@dataclass(frozen=True)
class BoundNetwork:
    """A network bound to an instruction, and where its arrays live."""

    call: NetworkFn
    arrays: ArrayOps


class TextBinding:
    """A network bound to the text embedding of the last instruction; it is rebound only when the task changes."""

    def __init__(self, network: DenoisingNetwork, text_embeddings: TextEmbeddings) -> None:
        self._network = network
        self._arrays = network.arrays if isinstance(network, DeviceNetwork) else HOST_ARRAYS
        self._text = text_embeddings
        self._bound: tuple[str, BoundNetwork] | None = None

    def for_instruction(self, instruction: str, timer: StageTimer) -> BoundNetwork:
        if self._bound is None or self._bound[0] != instruction:
            embedding = self._text.get(instruction)
            with timer.stage("text_conditioning"):
                self._bound = (instruction, BoundNetwork(self._network.bind_text(embedding), self._arrays))
        return self._bound[1]

    def reset(self) -> None:
        self._bound = None


def denoising_steps(query: ActionQuery, default: int) -> int:
    """The query's denoising steps of the action pass, or `default`."""
    steps = default if query.steps is None else query.steps
    if not 1 <= steps <= MAX_DENOISING_STEPS:
        raise InputError(f"steps: expected 1..{MAX_DENOISING_STEPS} denoising steps, got {steps}", field="steps")
    return steps


def check_proprio_shape(platform: PlatformSpec, proprio: np.ndarray) -> None:
    """One robot state: a history or a batch would be tiled into the proprio slot without a word."""
    shape = np.shape(proprio)
    if shape != (platform.proprio_dim,):
        raise InputError(f"proprio: expected shape ({platform.proprio_dim},), got {shape}", field="proprio")


def encode_observation(
    model: PolicyModel, observation: Observation, timer: StageTimer, full_sequence: bool
) -> EncodedObservation:
    """Encode the images and inject the normalised proprio. `full_sequence` encodes the whole pixel sequence as the
    official code does (needed to decode future images); otherwise the conditioning encoder encodes the prefix only,
    which gives the same latents because the encoder is causal."""
    platform = model.platform
    if not isinstance(observation, Observation):
        raise InputError(f"observation: expected an Observation, got {type(observation).__name__}")
    check_proprio_shape(platform, observation.proprio)
    proprio = model.stats.normalize_proprio(observation.proprio)
    _warn_untrained_proprio(platform, model.stats, proprio)
    if full_sequence:
        with timer.stage("preprocess"):
            video = latents.build_pixel_video(platform, preprocess_observation_images(platform, observation.images))
        with timer.stage("vae_encode"):
            encoded = model.autoencoder.encode(video)
    else:
        encoded = model.conditioning.encode_conditioning(observation.images, timer)
    placeholder = latents.pad_latent_frames(platform, encoded)
    return EncodedObservation(placeholder, latents.inject_proprio(platform, placeholder, proprio))


def _warn_untrained_proprio(platform: PlatformSpec, stats: DatasetStats, normalized: np.ndarray) -> None:
    """Logs, once per dimension, proprio a dataset range or more outside the statistics' range."""
    for dim in np.flatnonzero(np.abs(normalized) > PROPRIO_WARN):
        key = (platform.name, int(dim))
        if key in _proprio_warned:
            continue
        _proprio_warned.add(key)
        low, high = stats.proprio_min[dim], stats.proprio_max[dim]
        value = stats.unnormalize_proprio(normalized)[dim]
        _LOG.warning(
            "proprio[%d] = %g lies %.1f dataset ranges outside [%g, %g], where the policy was trained: check its "
            "units and joint order (said once per dimension)",
            dim,
            value,
            (abs(normalized[dim]) - 1.0) / 2.0,
            low,
            high,
        )


def sample_latents(
    network: BoundNetwork,
    platform: PlatformSpec,
    clean_latent: np.ndarray,
    mode: ConditioningMode,
    seeds: Sequence[int],
    steps: int | Sequence[int],
    timer: StageTimer,
    *,
    use_variance_scale: bool = False,
) -> np.ndarray:
    """One official sampling pass per seed (with `steps` for all, or one step count each), as one batch, run where
    the network's arrays live; every network call is timed as stage `dit`. Returns host latents "b c t h w".
    `use_variance_scale`: the official option (`sampler.variance_scale`)."""

    def record(seconds: float) -> None:
        timer.add("dit", seconds * 1e3)

    with timer.stage("denoise_total"):
        mask = condition_mask(platform, mode)
        denoiser = Denoiser(network.call, network.arrays)
        latent = sample(denoiser, clean_latent, mask, seeds, steps, record, use_variance_scale=use_variance_scale)
        return network.arrays.fetch(latent)


def read_chunks(model: PolicyModel, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Un-normalised action chunks "b chunk action_dim" and future proprio "b proprio_dim" of latents "b c t h w"."""
    return latents.read_actions(model.platform, model.stats, latent), latents.read_future_proprio(
        model.platform, model.stats, latent
    )


def check_finite_result(actions: np.ndarray, value: float, future_proprio: np.ndarray) -> None:
    """The chunk a query answers with, its value and future proprio are finite: NaN or infinity there is the network's
    failure (weights or an instruction embedding holding non-finite values, or a failing engine), never the request's.
    """
    if not (np.isfinite(actions).all() and np.isfinite(value) and np.isfinite(future_proprio).all()):
        raise NonFiniteOutput(
            "network output: NaN or infinity in the action chunk, its value or the future proprio; the networks "
            "returned non-finite values (check the weights of the DiT and the VAE, and the instruction's text "
            "embedding)"
        )


def read_values(platform: PlatformSpec, latent: np.ndarray) -> np.ndarray:
    """The value in [0, 1] of each latent "b c t h w" → float32 "b"."""
    return latents.read_value(latent, platform.value_slot)


def decode_future_images(
    model: PolicyModel, latent: np.ndarray, encoded: EncodedObservation, timer: StageTimer
) -> dict[str, np.ndarray]:
    """Restores the placeholder latents of the injected slots (official `get_future_images_from_generated_samples`),
    decodes the whole sequence and picks each future camera frame."""
    restored = latent[:1].copy()
    latents.copy_slots(restored, encoded.placeholder, placeholder_restore_slots(model.platform))
    with timer.stage("vae_decode"):
        video = model.autoencoder.decode(restored)
    return latents.future_image_frames(model.platform, video)
