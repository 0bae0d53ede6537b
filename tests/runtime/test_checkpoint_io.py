import io
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from cosmos_edge.runtime.errors import CheckpointError
from cosmos_edge.runtime.models.checkpoint_io import non_finite_tensors, read_tensor_file


@pytest.mark.parametrize("wrapper", [None, "model"])
def test_transformer_engine_extra_state_bytesio_reads_as_newer_versions_save_it(
    tmp_path: Path, wrapper: str | None
) -> None:
    path = tmp_path / "te.pt"
    state = {"net.w": torch.ones(2), "net.blocks.0.self_attn._extra_state": io.BytesIO(b"fp8 meta")}
    torch.save(state if wrapper is None else {wrapper: state, "iteration": 5}, path)
    read = read_tensor_file(path)
    assert list(read) == ["net.w", "net.blocks.0.self_attn._extra_state"]  # the loaders drop (and list) extra state
    assert bytes(read["net.blocks.0.self_attn._extra_state"].numpy()) == b"fp8 meta"


@pytest.mark.parametrize("wrapper", ["model", "state_dict"])
def test_wrapped_state_dicts_are_unwrapped(tmp_path: Path, wrapper: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({wrapper: {"net.w": torch.zeros(3)}, "iteration": 5}, path)
    assert list(read_tensor_file(path)) == ["net.w"]


def test_an_ema_copy_beside_the_wrapped_weights_is_named_as_not_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({"model": {"net.w": torch.zeros(3)}, "ema": {"net.w": torch.ones(3)}, "iteration": 5}, path)
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.runtime.models.checkpoint_io"):
        assert torch.equal(read_tensor_file(path)["net.w"], torch.zeros(3))
    assert f"{path}: loading the weights under 'model'; not those under ['ema']" in caplog.text


def test_a_safetensors_file_that_cannot_be_read_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "dit.safetensors"
    path.write_bytes(b"x")

    def denied(name: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("cosmos_edge.runtime.models.checkpoint_io.load_safetensors", denied)
    with pytest.raises(CheckpointError, match=rf"^{path}: cannot be read \(Permission denied\)$"):
        read_tensor_file(path)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"net.w": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="unpickling") as caught:
        read_tensor_file(path)
    assert not marker.exists()
    message = str(caught.value)  # one line naming what the file needs, without torch's advice to trust it
    assert "GLOBAL" in message and "system" in message
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message


def test_a_json_file_given_as_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "aloha_dataset_statistics.json"
    path.write_text('{"actions_min": [0.0]}')
    with pytest.raises(CheckpointError, match=r"it looks like JSON \(the dataset statistics\?\)"):
        read_tensor_file(path)


def test_a_pickle_given_as_a_checkpoint_points_at_the_embeddings_converter(tmp_path: Path) -> None:
    path = tmp_path / "aloha_t5_embeddings.pkl"
    path.write_bytes(pickle.dumps({"fold the shirt": [0.0]}, protocol=4))
    with pytest.raises(CheckpointError, match=r"it is a Python pickle: the official T5 embeddings \(`cosmos-edge "):
        read_tensor_file(path)


def test_missing_file_and_non_tensor_content(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_tensor_file(tmp_path / "absent.pt")
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="dict of tensors"):
        read_tensor_file(path)


def test_tensors_holding_nan_or_infinity_are_named_in_every_float_dtype() -> None:
    tensors = {
        "fine": torch.ones(3, dtype=torch.bfloat16),
        "nan": torch.tensor([1.0, float("nan")]),
        "inf_half": torch.tensor([float("inf")], dtype=torch.float16),
        "nan_fp8": torch.tensor([float("nan")]).to(torch.float8_e4m3fn),  # torch has no isfinite for float8
        "fine_fp8": torch.ones(2).to(torch.float8_e4m3fn),
        "ints": torch.arange(3),
    }
    assert non_finite_tensors(tensors) == ["inf_half", "nan", "nan_fp8"]
