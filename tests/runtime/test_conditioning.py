import numpy as np
import pytest

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PLATFORMS, PlatformSpec, SlotKind
from cosmos_edge.runtime.policy import latents
from cosmos_edge.runtime.policy.conditioning import (
    ConditioningMode,
    clean_slots,
    condition_mask,
    future_to_current_slots,
    placeholder_restore_slots,
)

# Clean slots per mode, read off the official slot tables (LIBERO 9 slots, RoboCasa and ALOHA 11 slots).
EXPECTED_CLEAN = {
    "libero": {
        ConditioningMode.POLICY: (0, 1, 2, 3),
        ConditioningMode.WORLD_MODEL: (0, 1, 2, 3, 4),
        ConditioningMode.VALUE: (0, 1, 2, 3, 4, 5, 6, 7),
        ConditioningMode.VALUE_FUTURE_STATE: (0, 5, 6, 7),
        ConditioningMode.Q_VALUE: (0, 1, 2, 3, 4),
    },
    "robocasa": {
        ConditioningMode.POLICY: (0, 1, 2, 3, 4),
        ConditioningMode.WORLD_MODEL: (0, 1, 2, 3, 4, 5),
        ConditioningMode.VALUE: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
        ConditioningMode.VALUE_FUTURE_STATE: (0, 6, 7, 8, 9),
        ConditioningMode.Q_VALUE: (0, 1, 2, 3, 4, 5),
    },
    "aloha": {
        ConditioningMode.POLICY: (0, 1, 2, 3, 4),
        ConditioningMode.WORLD_MODEL: (0, 1, 2, 3, 4, 5),
        ConditioningMode.VALUE: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
        ConditioningMode.VALUE_FUTURE_STATE: (0, 6, 7, 8, 9),
        ConditioningMode.Q_VALUE: (0, 1, 2, 3, 4, 5),
    },
}

# Slot kinds that are clean per mode, independent of the platform.
CURRENT = {SlotKind.PROPRIO, SlotKind.CAMERA}
FUTURE = {SlotKind.FUTURE_PROPRIO, SlotKind.FUTURE_CAMERA}
CLEAN_KINDS = {
    ConditioningMode.POLICY: {SlotKind.BLANK, *CURRENT},
    ConditioningMode.WORLD_MODEL: {SlotKind.BLANK, *CURRENT, SlotKind.ACTION},
    ConditioningMode.VALUE: {SlotKind.BLANK, *CURRENT, SlotKind.ACTION, *FUTURE},
    ConditioningMode.VALUE_FUTURE_STATE: {SlotKind.BLANK, *FUTURE},
    ConditioningMode.Q_VALUE: {SlotKind.BLANK, *CURRENT, SlotKind.ACTION},
}

ALL_CASES = [(name, mode) for name in PLATFORMS for mode in ConditioningMode]


@pytest.mark.parametrize(("name", "mode"), ALL_CASES)
def test_mask_marks_the_official_clean_slots(name: str, mode: ConditioningMode) -> None:
    spec = PLATFORMS[name]
    mask = condition_mask(spec, mode)
    assert mask.dtype == np.float32 and mask.shape == (1, 1, spec.num_latent_frames, 1, 1)
    assert tuple(np.flatnonzero(mask[0, 0, :, 0, 0])) == EXPECTED_CLEAN[name][mode]
    assert set(np.unique(mask)) <= {0.0, 1.0}


@pytest.mark.parametrize(("name", "mode"), ALL_CASES)
def test_clean_slots_follow_slot_kinds(name: str, mode: ConditioningMode) -> None:
    spec = PLATFORMS[name]
    kinds = {spec.slots[index].kind for index in clean_slots(spec, mode)}
    assert kinds == CLEAN_KINDS[mode]
    assert spec.value_slot not in clean_slots(spec, mode)


def test_policy_mask_is_num_conditional_frames_prefix() -> None:
    for spec in PLATFORMS.values():
        assert clean_slots(spec, ConditioningMode.POLICY) == tuple(range(spec.num_conditional_frames))


@pytest.mark.parametrize(
    ("name", "expected"), [("libero", (0, 1, 4, 5)), ("robocasa", (0, 1, 5, 6)), ("aloha", (0, 1, 5, 6))]
)
def test_placeholder_restore_slots(name: str, expected: tuple[int, ...]) -> None:
    assert placeholder_restore_slots(PLATFORMS[name]) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("libero", ((5, 1), (6, 2), (7, 3))),
        ("robocasa", ((6, 1), (7, 2), (8, 3), (9, 4))),
        ("aloha", ((6, 1), (7, 2), (8, 3), (9, 4))),
    ],
)
def test_future_to_current_slots(name: str, expected: tuple[tuple[int, int], ...]) -> None:
    assert future_to_current_slots(PLATFORMS[name]) == expected


def _tagged_latent(spec: PlatformSpec, batch: int = 2) -> np.ndarray:
    latent = np.zeros((batch, 4, spec.num_latent_frames, 2, 2), dtype=np.float32)
    latent += np.arange(spec.num_latent_frames, dtype=np.float32)[None, None, :, None, None]
    return latent


@pytest.mark.parametrize("name", list(PLATFORMS))
def test_promote_future_state_copies_future_into_current_slots(name: str) -> None:
    spec = PLATFORMS[name]
    latent = _tagged_latent(spec)
    promoted = latents.promote_future_state(latent, spec)
    pairs = dict((current, future) for future, current in future_to_current_slots(spec))
    for slot in range(spec.num_latent_frames):
        assert np.all(promoted[:, :, slot] == pairs.get(slot, slot))
    np.testing.assert_array_equal(latent, _tagged_latent(spec))  # input untouched


def test_promote_future_state_rejects_other_layouts() -> None:
    with pytest.raises(InputError, match="libero"):
        latents.promote_future_state(_tagged_latent(PLATFORMS["aloha"]), PLATFORMS["libero"])
