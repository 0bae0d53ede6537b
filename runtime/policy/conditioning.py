"""Which latent slots are clean conditioning input in each inference mode, and the slot bookkeeping around them.

Official source: `Video2WorldCondition.set_video_condition` marks the first N latent frames clean, then
`CosmosPolicyVideo2WorldModel.get_x0_fn_from_batch` forces the current-proprio slot to 1 and, per mode, zeroes
further slots. N comes from `cosmos_utils.get_action` / `get_future_state_prediction` / `get_value_prediction` /
`get_qvalue_prediction`.

Masks are per latent frame, float32, shaped "1 1 t 1 1" (the official mask is constant over channels, height and
width); stack per-candidate masks along axis 0 for a batch. `sampler.sample` broadcasts them to the network's
"b 1 t h w" mask channel.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import numpy.typing as npt

from cosmos_edge.runtime.platforms import PlatformSpec


class ConditioningMode(str, Enum):
    POLICY = "policy"
    """Action pass: blank + current state clean (`min_num_conditional_frames`)."""
    WORLD_MODEL = "world_model"
    """Future-state pass: the policy frames plus the action slot (N + 1)."""
    VALUE = "value"
    """V(s, a, s'): every slot but the value slot (state_t − 1), no input masking (planning with
    `mask_current_state_action_for_value_prediction=False`, or a Q pass without its future-state masking)."""
    VALUE_FUTURE_STATE = "value_future_state"
    """V(s'): as VALUE with `mask_current_state_action_for_value_prediction`: only blank + future state clean."""
    Q_VALUE = "q_value"
    """Q(s, a): as VALUE with `mask_future_state_for_qvalue_prediction`: blank, current state and action clean."""


def _current_state_slots(spec: PlatformSpec) -> tuple[int, ...]:
    return (spec.proprio_slot, *(spec.camera_slots[name] for name in spec.cameras))


def _future_state_slots(spec: PlatformSpec) -> tuple[int, ...]:
    return (spec.future_proprio_slot, *(spec.future_camera_slots[name] for name in spec.cameras))


def clean_slots(spec: PlatformSpec, mode: ConditioningMode) -> tuple[int, ...]:
    """Sorted indices of the latent slots that are clean conditioning frames in `mode`."""
    policy_frames = spec.num_conditional_frames
    if mode is ConditioningMode.POLICY:
        return tuple(range(policy_frames))
    if mode is ConditioningMode.WORLD_MODEL:
        return tuple(range(policy_frames + 1))  # the action slot directly follows the current state
    all_but_value = set(range(spec.num_latent_frames - 1))  # the value slot is last
    if mode is ConditioningMode.VALUE_FUTURE_STATE:
        all_but_value -= {*_current_state_slots(spec), spec.action_slot}
    elif mode is ConditioningMode.Q_VALUE:
        all_but_value -= set(_future_state_slots(spec))
    return tuple(sorted(all_but_value))


def condition_mask(spec: PlatformSpec, mode: ConditioningMode) -> npt.NDArray[np.float32]:
    """ "1 1 t 1 1" float32 mask, 1 on the clean slots of `mode`."""
    mask = np.zeros((1, 1, spec.num_latent_frames, 1, 1), dtype=np.float32)
    mask[0, 0, list(clean_slots(spec, mode)), 0, 0] = 1.0
    return mask


def placeholder_restore_slots(spec: PlatformSpec) -> tuple[int, ...]:
    """Slots to reset to the pre-injection VAE latents before decoding future images.

    Blank, proprio, action and future proprio (official `INDICES_TO_REPLACE`: LIBERO 0, 1, 4, 5; RoboCasa and ALOHA
    0, 1, 5, 6): decoding injected vectors gives heavy artefacts, and the causal decoder carries them forward.
    """
    return (0, spec.proprio_slot, spec.action_slot, spec.future_proprio_slot)


def future_to_current_slots(spec: PlatformSpec) -> tuple[tuple[int, int], ...]:
    """(future slot, current slot) pairs copied before the next level of a depth > 1 search.

    Proprio and cameras in slot order: ALOHA / RoboCasa 6–9 → 1–4, LIBERO 5–7 → 1–3 (official
    `FUTURE_STATE_*_LATENT_IDX` → `CURR_STATE_*_LATENT_IDX`).
    """
    return tuple(zip(_future_state_slots(spec), _current_state_slots(spec), strict=True))
