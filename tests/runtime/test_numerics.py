import numpy as np
import pytest
import torch

from cosmos_edge.runtime.policy.numerics import bf16_bits_to_float32, float32_to_bf16_bits, round_to_bf16


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 80.0, 1e30])
def test_round_to_bf16_matches_torch(scale: float) -> None:
    values = (np.random.default_rng(0).standard_normal(10_000) * scale).astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(round_to_bf16(values), expected)


def test_bits_round_trip() -> None:
    values = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    bits = float32_to_bf16_bits(values)
    assert bits.dtype == np.uint16
    expected_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected_bits)
    np.testing.assert_array_equal(bf16_bits_to_float32(bits), round_to_bf16(values))


def test_round_to_bf16_keeps_scalar_shape() -> None:
    rounded = round_to_bf16(np.float32(0.987654))
    assert rounded.shape == ()
    assert rounded == torch.tensor(0.987654).to(torch.bfloat16).float().item()
