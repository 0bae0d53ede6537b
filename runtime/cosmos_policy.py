"""A Cosmos Policy query with the official semantics, on any networks that meet `networks_api`.

The reference policy is this class on eager torch networks with the whole-sequence VAE encode; bundles serve the
same class on ONNX Runtime or TensorRT networks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cosmos_edge.runtime import latent_codec
from cosmos_edge.runtime.conditioning import ConditioningMode, condition_mask, placeholder_restore_slots
from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.images import preprocess_observation_images
from cosmos_edge.runtime.networks_api import DenoisingNetwork, VideoAutoencoder
from cosmos_edge.runtime.normalization import DatasetStats
from cosmos_edge.runtime.observation_encoding import (
    build_pixel_video,
    future_image_frames,
    inject_proprio,
    pad_latent_frames,
    read_actions,
    read_future_proprio,
)
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy_api import ActionQuery, ChunkResult, Observation
from cosmos_edge.runtime.sampler import Denoiser, NetworkCall, NetworkFn, sample
from cosmos_edge.runtime.text_embeddings import TextEmbeddings
from cosmos_edge.runtime.timing import StageTimer


@dataclass(frozen=True)
class PolicyOptions:
    """`encode_full_sequence`: encode all 33/41 pixel frames as the official code does. False encodes only the
    conditioning prefix (13/17 frames), which gives identical conditioning latents because the encoder is causal;
    a query that asks for future images still encodes everything (their decode needs the placeholder latents)."""

    encode_full_sequence: bool = True


@dataclass(frozen=True)
class EncodedObservation:
    """`placeholder` is the pre-injection VAE latent (for future-image decoding); `clean` the conditioning latent."""

    placeholder: np.ndarray
    clean: np.ndarray


class CosmosPolicy:
    """Action chunk, value and future proprio of one observation in one policy pass (official `get_action`)."""

    def __init__(
        self,
        platform: PlatformSpec,
        stats: DatasetStats,
        text_embeddings: TextEmbeddings,
        autoencoder: VideoAutoencoder,
        network: DenoisingNetwork,
        options: PolicyOptions | None = None,
    ) -> None:
        if stats.action_dim != platform.action_dim or stats.proprio_dim != platform.proprio_dim:
            raise InputError(
                f"stats: {platform.name} needs action/proprio dims {platform.action_dim}/{platform.proprio_dim}, "
                f"got {stats.action_dim}/{stats.proprio_dim}"
            )
        self._platform = platform
        self._stats = stats
        self._text = text_embeddings
        self._autoencoder = autoencoder
        self._network = network
        self._options = options or PolicyOptions()
        self._bound: tuple[str, NetworkFn] | None = None  # the network bound to the last instruction

    @property
    def platform(self) -> PlatformSpec:
        return self._platform

    @property
    def instructions(self) -> tuple[str, ...]:
        return self._text.instructions

    @property
    def stats(self) -> DatasetStats:
        return self._stats

    def reset(self) -> None:
        self._bound = None

    def infer(self, query: ActionQuery) -> ChunkResult:
        steps = self.action_steps(query)
        timer = StageTimer()
        network = self.network_for(query.instruction, timer)
        full = self._options.encode_full_sequence or query.return_future_images
        encoded = self.encode(query.observation, timer, full_sequence=full)
        latent = self.denoise(network, encoded.clean, ConditioningMode.POLICY, [query.seed], steps, timer)
        with timer.stage("readout"):
            actions, future_proprio = self.read_chunk(latent)
            value = float(latent_codec.read_value(latent, self._platform.value_slot)[0])
        future_images = self.decode_future_images(latent, encoded, timer) if query.return_future_images else None
        return ChunkResult(actions, value, future_proprio, future_images, timer.as_dict())

    def action_steps(self, query: ActionQuery) -> int:
        """The query's denoising steps, or the platform's default."""
        steps = self._platform.default_action_steps if query.steps is None else query.steps
        if steps < 1:
            raise InputError(f"steps: expected a positive number of denoising steps, got {steps}")
        return steps

    def read_chunk(self, latent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Un-normalised action chunk and future proprio of a one-sample latent "1 c t h w"."""
        actions = read_actions(self._platform, self._stats, latent)[0]
        return actions, read_future_proprio(self._platform, self._stats, latent)[0]

    def network_for(self, instruction: str, timer: StageTimer) -> NetworkFn:
        """The network bound to `instruction`'s text embedding; rebinding happens only when the task changes."""
        if self._bound is None or self._bound[0] != instruction:
            embedding = self._text.get(instruction)
            with timer.stage("text_conditioning"):
                self._bound = (instruction, self._network.bind_text(embedding))
        return self._bound[1]

    def encode(self, observation: Observation, timer: StageTimer, full_sequence: bool) -> EncodedObservation:
        with timer.stage("preprocess"):
            if not isinstance(observation, Observation):
                raise InputError(f"observation: expected an Observation, got {type(observation).__name__}")
            proprio = self._stats.normalize_proprio(observation.proprio)
            images = preprocess_observation_images(self._platform, observation.images)
            frames = None if full_sequence else self._platform.num_conditional_frames
            video = build_pixel_video(self._platform, images, frames)
        with timer.stage("vae_encode"):
            placeholder = pad_latent_frames(self._platform, self._autoencoder.encode(video))
        return EncodedObservation(placeholder, inject_proprio(self._platform, placeholder, proprio))

    def denoise(
        self,
        network: NetworkFn,
        clean_latent: np.ndarray,
        mode: ConditioningMode,
        seeds: list[int],
        steps: int,
        timer: StageTimer,
    ) -> np.ndarray:
        """One official sampling pass; every network call is timed as stage `dit`."""
        mask = condition_mask(self._platform, mode)

        def record(call: NetworkCall) -> None:
            timer.add("dit", call.seconds * 1e3)

        with timer.stage("denoise_total"):
            return sample(Denoiser(network), clean_latent, mask, seeds, steps, on_network_call=record)

    def decode_future_images(
        self, latent: np.ndarray, encoded: EncodedObservation, timer: StageTimer
    ) -> dict[str, np.ndarray]:
        """Restores the placeholder latents of the injected slots (official `get_future_images_from_generated_samples`),
        decodes the whole sequence and picks each future camera frame."""
        restored = latent[:1].copy()
        slots = list(placeholder_restore_slots(self._platform))
        restored[:, :, slots] = encoded.placeholder[:, :, slots]
        with timer.stage("vae_decode"):
            video = self._autoencoder.decode(restored)
        return future_image_frames(self._platform, video)
