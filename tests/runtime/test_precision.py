"""The default rules `act` and `serve` share for the torch backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.engines.registry import load_torch_backend
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.precision import compile_mode, cuda_graphs, default_precision


def test_cuda_devices_get_bf16_compilation_and_cuda_graphs_by_default() -> None:
    def defaults(devices: list[str]) -> tuple[str, str | None, bool]:
        return default_precision(devices), compile_mode(None, devices), cuda_graphs(None, devices)

    assert defaults(["cuda:0"]) == ("bf16", "default", True)
    assert defaults(["cpu"]) == ("fp32", None, False)


def test_cuda_graphs_follow_the_flag_and_are_refused_off_cuda() -> None:
    assert not cuda_graphs(False, ["cuda:0", "cuda:1"])
    assert not cuda_graphs(None, ["cuda:0", "cpu"])
    with pytest.raises(ConfigError, match=r"^cuda_graphs: CUDA graphs need CUDA devices; got \['cuda:0', 'cpu'\]"):
        cuda_graphs(True, ["cuda:0", "cpu"])


def test_a_checkpoint_source_for_devices_takes_the_commands_defaults() -> None:
    files = CheckpointFiles(Path("dit.pt"), Path("tokenizer.pth"), Path("stats.json"), Path("t5.safetensors"), "aloha")
    on_cuda = CheckpointSource.for_devices(files, ["cuda:0", "cuda:1"])
    assert (on_cuda.precision, on_cuda.compile_mode, on_cuda.cuda_graphs) == ("bf16", "default", True)
    on_cpu = CheckpointSource.for_devices(files, ["cpu"])
    assert (on_cpu.precision, on_cpu.compile_mode, on_cpu.cuda_graphs) == ("fp32", None, False)
    chosen = CheckpointSource.for_devices(files, ["cuda:0"], precision="fp32", compile=False, cuda_graphs=False)
    assert (chosen.precision, chosen.compile_mode, chosen.cuda_graphs) == ("fp32", None, False)
    reference = CheckpointSource.for_devices(files, ["cuda:0"], reference=True)
    assert (reference.precision, reference.compile_mode, reference.cuda_graphs) == ("bf16", None, False)
    assert reference.encode_full_sequence and not on_cuda.encode_full_sequence
    with pytest.raises(ConfigError, match="reference: runs the official path uncompiled, without graphs; got compile="):
        CheckpointSource.for_devices(files, ["cuda:0"], reference=True, compile=True)


@pytest.mark.parametrize(("cuda_seen", "expected"), [(True, ("bf16", "default", True)), (False, ("fp32", None, False))])
def test_no_device_named_is_cuda_when_torch_sees_one(
    monkeypatch: pytest.MonkeyPatch, cuda_seen: bool, expected: tuple[str, str | None, bool]
) -> None:
    """The fast path is the default: the official files go to the GPU of a workstation unless a device is named."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_seen)
    files = CheckpointFiles(Path("dit.pt"), Path("tokenizer.pth"), Path("stats.json"), Path("t5.safetensors"), "aloha")
    source = CheckpointSource.for_devices(files, [])
    assert (source.precision, source.compile_mode, source.cuda_graphs) == expected
    assert load_torch_backend().default_device() == ("cuda" if cuda_seen else "cpu")  # where the loader puts them
