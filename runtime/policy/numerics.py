"""bfloat16 arithmetic in numpy, so the serving path reproduces the official bf16 roundings without torch."""

from __future__ import annotations

import numpy as np


def round_to_bf16(values: np.ndarray) -> np.ndarray:
    """Rounds float32 values to the nearest bfloat16 (ties to even), returned as float32.

    Matches `torch.Tensor.to(torch.bfloat16)` for finite values. Integer arithmetic in place on a copy: this runs on
    every query's latent, where a float64 detour and its temporaries cost milliseconds.
    """
    rounded = np.array(values, dtype=np.float32, order="C")  # a copy (keeps 0-d shapes, unlike ascontiguousarray)
    bits = rounded.view(np.uint32)
    bias = bits >> 16
    bias &= 1
    bias += 0x7FFF
    bits += bias  # modulo 2**32: what a wider sum cut to 32 bits gives, for every input
    bits &= 0xFFFF0000
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widens raw bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Rounds to bfloat16 and returns the raw bit patterns (uint16)."""
    return (round_to_bf16(values).view(np.uint32) >> 16).astype(np.uint16)
