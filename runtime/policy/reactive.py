"""The reactive query: one observation, one sampling pass of the policy model (official `get_action`)."""

from __future__ import annotations

from cosmos_edge.runtime.policy.api import ActionQuery, ChunkResult, DenoisingNetwork, StageTimer
from cosmos_edge.runtime.policy.conditioning import ConditioningMode
from cosmos_edge.runtime.policy.steps import (
    ModelPolicy,
    PolicyModel,
    TextBinding,
    check_finite_result,
    decode_future_images,
    denoising_steps,
    encode_observation,
    read_chunks,
    read_values,
    sample_latents,
)


class ReactivePolicy(ModelPolicy):
    """Action chunk, value and future proprio of one observation in one policy pass.

    `encode_full_sequence`: encode all 33/41 pixel frames as the official code does (the reference). False encodes
    only the conditioning prefix (13/17 frames), which gives the same conditioning latents because the encoder is
    causal; a query that asks for future images still encodes everything (their decode needs the placeholder
    latents).

    `use_variance_scale`: the official option of that name (off in every documented command): the pass's sigma range
    scaled by factors drawn from its seed (`sampler.variance_scale`).
    """

    def __init__(
        self,
        model: PolicyModel,
        network: DenoisingNetwork,
        *,
        encode_full_sequence: bool = False,
        use_variance_scale: bool = False,
    ) -> None:
        self._model = model
        self._text = TextBinding(network, model.text_embeddings)
        self._encode_full_sequence = encode_full_sequence
        self._use_variance_scale = use_variance_scale

    def reset(self) -> None:
        self._text.reset()

    def infer(self, query: ActionQuery) -> ChunkResult:
        steps = denoising_steps(query, self.platform.default_action_steps)
        timer = StageTimer()
        network = self._text.for_instruction(query.instruction, timer)
        full = self._encode_full_sequence or query.return_future_images
        encoded = encode_observation(self._model, query.observation, timer, full_sequence=full)
        latent = sample_latents(
            network,
            self.platform,
            encoded.clean,
            ConditioningMode.POLICY,
            [query.seed],
            steps,
            timer,
            use_variance_scale=self._use_variance_scale,
        )
        with timer.stage("readout"):
            actions, future_proprio = read_chunks(self._model, latent)
            value = float(read_values(self.platform, latent)[0])
        check_finite_result(actions[0], value, future_proprio[0])
        future_images = (
            decode_future_images(self._model, latent, encoded, timer) if query.return_future_images else None
        )
        return ChunkResult(actions[0], value, future_proprio[0], future_images, timer.as_dict())
