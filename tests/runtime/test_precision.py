"""The default rules `act` and `serve` share for the torch backend."""

from __future__ import annotations

import pytest

from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.precision import compile_mode, cuda_graphs, default_precision


def test_cuda_devices_get_bf16_compilation_and_cuda_graphs_by_default() -> None:
    def defaults(devices: list[str]) -> tuple[str, str | None, bool]:
        return default_precision(devices), compile_mode(None, devices), cuda_graphs(None, devices)

    assert defaults(["cuda:0"]) == ("bf16", "default", True)
    assert defaults(["cpu"]) == ("fp32", None, False)


def test_cuda_graphs_follow_the_flag_and_are_refused_off_cuda() -> None:
    assert not cuda_graphs(False, ["cuda:0", "cuda:1"])
    assert not cuda_graphs(None, ["cuda:0", "cpu"])
    with pytest.raises(ConfigError, match=r"--cuda-graphs: CUDA graphs need CUDA devices; got \['cuda:0', 'cpu'\]"):
        cuda_graphs(True, ["cuda:0", "cpu"])
