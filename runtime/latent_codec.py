"""Writing vectors into latent slots and reading them back (official "latent injection").

A slot is one latent frame, [16, 28, 28] = 12544 values. Official code: CP `models/policy_text2world_model.py`
`replace_latent_with_action_chunk` / `replace_latent_with_proprio` (write), CP `experiments/robot/cosmos_utils.py`
`extract_action_chunk_from_latent_sequence` / `extract_value_from_latent_sequence` and `get_action` (read).

* Write: flatten the vector row-major (an action chunk [K, d] becomes a0[0..d-1], a1[...], ...), repeat it end to
  end, truncate to 12544 values and reshape C-major to [16, 28, 28]. The slot is fully overwritten.
* Read: flatten the slot, keep the floor(12544 / n) full copies, average them; the partial tail is ignored
  (ALOHA 50×14 = 700 → 17 copies, 644 values ignored).
* Value: a scalar broadcast over the slot; read as the slot mean, mapped from [-1, 1] to [0, 1] and clipped.
* Proprio is a bfloat16 tensor in the official batch (`torch.from_numpy(proprio).to(torch.bfloat16)`), so it is
  rounded to bfloat16 before it is written.

All functions take latents [B, 16, T, 28, 28] (float32) and a slot index; writes happen in place.
"""

from __future__ import annotations

import math

import numpy as np

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.numerics import round_to_bf16
from cosmos_edge.runtime.platforms import LATENT_CHANNELS, LATENT_SIZE

SLOT_SHAPE = (LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
SLOT_ELEMENTS = LATENT_CHANNELS * LATENT_SIZE * LATENT_SIZE  # 12544


def write_vector(latents: np.ndarray, slot: int, vectors: np.ndarray) -> None:
    """Tiles each batch item's vector [B, *shape] (flattened row-major) over `latents[:, :, slot]`."""
    _check_latents(latents, slot)
    batch = latents.shape[0]
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim < 2 or vectors.shape[0] != batch or not 0 < math.prod(vectors.shape[1:]) <= SLOT_ELEMENTS:
        raise InputError(
            f"vectors: expected [B={batch}, ...] with 1 to {SLOT_ELEMENTS} values per item, got {list(vectors.shape)}"
        )
    flat = vectors.reshape(batch, -1)
    copies = -(-SLOT_ELEMENTS // flat.shape[1])  # ceiling division
    latents[:, :, slot] = np.tile(flat, (1, copies))[:, :SLOT_ELEMENTS].reshape(batch, *SLOT_SHAPE)


def write_proprio(latents: np.ndarray, slot: int, proprio: np.ndarray) -> None:
    """Writes normalised proprio [B, proprio_dim] after rounding it to bfloat16, as the official batch does."""
    write_vector(latents, slot, round_to_bf16(np.asarray(proprio, dtype=np.float32)))


def write_value(latents: np.ndarray, slot: int, values: np.ndarray) -> None:
    """Broadcasts one scalar per batch item [B] (in the model's [-1, 1] value range) over the slot."""
    _check_latents(latents, slot)
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (latents.shape[0],):
        raise InputError(f"values: expected shape [{latents.shape[0]}], got {list(values.shape)}")
    latents[:, :, slot] = values[:, None, None, None]


def read_vector(latents: np.ndarray, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    """Averages the full copies of a vector of `shape` tiled in the slot → float32 [B, *shape].

    Used for action chunks (shape (chunk, action_dim)) and future proprio (shape (proprio_dim,)).
    """
    _check_latents(latents, slot)
    size = math.prod(shape)
    if not 0 < size <= SLOT_ELEMENTS:
        raise InputError(f"shape: expected 1 to {SLOT_ELEMENTS} values, got {shape} ({size} values)")
    batch = latents.shape[0]
    copies = SLOT_ELEMENTS // size
    flat = latents[:, :, slot].reshape(batch, SLOT_ELEMENTS)[:, : copies * size]
    # float64 accumulation keeps the mean independent of summation order (torch and numpy sum differently).
    mean = flat.reshape(batch, copies, size).mean(axis=1, dtype=np.float64)
    return mean.astype(np.float32).reshape(batch, *shape)


def read_value(latents: np.ndarray, slot: int) -> np.ndarray:
    """Slot mean per batch item, mapped [-1, 1] → [0, 1] and clipped → float32 [B] (official `get_action`)."""
    _check_latents(latents, slot)
    mean = latents[:, :, slot].reshape(latents.shape[0], SLOT_ELEMENTS).mean(axis=1, dtype=np.float64)
    return np.clip((mean + 1.0) / 2.0, 0.0, 1.0).astype(np.float32)


def _check_latents(latents: np.ndarray, slot: int) -> None:
    if not isinstance(latents, np.ndarray) or latents.ndim != 5 or latents.shape[1:2] + latents.shape[3:] != SLOT_SHAPE:
        got = list(latents.shape) if isinstance(latents, np.ndarray) else type(latents).__name__
        expected = f"[B, {LATENT_CHANNELS}, T, {LATENT_SIZE}, {LATENT_SIZE}]"
        raise InputError(f"latents: expected a numpy array {expected}, got {got}")
    if not 0 <= slot < latents.shape[2]:
        raise InputError(f"slot: expected an index in [0, {latents.shape[2]}), got {slot}")
