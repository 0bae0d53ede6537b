"""The sampler over device tensors (the torch backend's `TorchArrays`) gives numpy's bits: same schedule, noise,
conditioning, solver arithmetic and bf16 timesteps, on the CPU here (benchmarks/gpu_check.py checks a GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.engines.torch_arrays import TorchArrays
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.api import ActionQuery, DenoisingNetwork, DeviceNetwork, NetworkFn
from cosmos_edge.runtime.policy.arrays import HOST_ARRAYS
from cosmos_edge.runtime.policy.reactive import ReactivePolicy
from cosmos_edge.runtime.policy.sampler import Denoiser, sample
from tests.helpers.observations import random_observation

SHAPE = (16, 6, 4, 4)


def network(x_in, timesteps, mask):  # type: ignore[no-untyped-def]
    """Arithmetic that numpy arrays and tensors both support; it reads each row's timesteps (a host array, as the
    sampler always passes them) and mask."""
    if isinstance(x_in, torch.Tensor):
        timesteps = torch.from_numpy(timesteps)
    return 0.3 * x_in * (1 + timesteps[:, None, :, None, None]) + mask - 0.1 * x_in * x_in


def mask(*clean: int) -> np.ndarray:
    frames = np.zeros((1, 1, SHAPE[1], 1, 1), np.float32)
    frames[:, :, list(clean)] = 1
    return frames


@pytest.mark.parametrize("steps", [1, 5, [5, 1, 3, 2]], ids=["one call", "five steps", "mixed step counts"])
def test_a_pass_on_tensors_gives_the_bits_of_a_pass_on_numpy(steps: int | list[int]) -> None:
    clean = np.random.default_rng(0).standard_normal((4, *SHAPE)).astype(np.float32)
    masks = np.concatenate([mask(0, 1), mask(0, 1, 2), mask(0), mask(0, 1)])
    seeds = [3, 4, 5, 6]
    on_host = sample(Denoiser(network, HOST_ARRAYS), clean, masks, seeds, steps)
    arrays = TorchArrays(torch.device("cpu"))
    on_device = sample(Denoiser(network, arrays), clean, masks, seeds, steps)
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.float32
    np.testing.assert_array_equal(arrays.fetch(on_device), on_host)


class HostOnly:
    """The same network without its `arrays`: the sampler then runs on numpy."""

    def __init__(self, network: DenoisingNetwork) -> None:
        self._network = network

    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        return self._network.bind_text(text_embedding)


def test_the_torch_backends_query_on_tensors_equals_the_query_on_numpy(tiny_assets: dict[str, CheckpointFiles]) -> None:
    with load_policies(CheckpointSource(tiny_assets["aloha"])) as loaded:
        assert isinstance(loaded.device_networks[0].policy_network, DeviceNetwork)  # its passes run on tensors
        on_device = loaded.reactive
        on_host = ReactivePolicy(on_device.model, HostOnly(loaded.device_networks[0].policy_network))
        query = ActionQuery(random_observation("aloha", seed=2), on_device.instructions[0], seed=7, steps=5)
        device_result, host_result = on_device.infer(query), on_host.infer(query)
    np.testing.assert_array_equal(device_result.actions, host_result.actions)
    assert device_result.value == host_result.value
    np.testing.assert_array_equal(device_result.future_proprio, host_result.future_proprio)


def test_the_noise_of_a_seed_is_uploaded_once() -> None:
    arrays = TorchArrays(torch.device("cpu"))
    made: list[int] = []

    def make() -> np.ndarray:
        made.append(1)
        return np.zeros(3, np.float32)

    first, again = arrays.put_cached(("noise", 1), make), arrays.put_cached(("noise", 1), make)
    assert first is again and made == [1]
