import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmos_edge.cli import text_embeddings_cmd
from cosmos_edge.runtime.errors import CheckpointError, EngineError
from cosmos_edge.runtime.policy import text_embeddings


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cosmos-edge")
    text_embeddings_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _official_pickle(path: Path) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    source = {
        text: torch.from_numpy(rng.standard_normal((1, 8, 16)).astype(np.float32)).to(torch.bfloat16)
        for text in ("pick up the cup", "stack the blocks")
    }
    with path.open("wb") as file:
        pickle.dump(source, file)
    return source


def test_convert_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _official_pickle(tmp_path / "t5.pkl")
    out = tmp_path / "t5.safetensors"
    assert _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(out), "--trust-pickle"]) == 0
    assert "wrote 2 embeddings of shape [1, 8, 16]" in capsys.readouterr().out
    np.testing.assert_array_equal(text_embeddings.read(out).get("pick up the cup"), source["pick up the cup"].float())

    assert _run(["text-embeddings", "list", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["pick up the cup", "stack the blocks"]


def test_convert_needs_trust_pickle(tmp_path: Path) -> None:
    _official_pickle(tmp_path / "t5.pkl")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(tmp_path / "t5.safetensors")])


def test_embed_reports_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EngineError, match="transformers"):
        _run(["text-embeddings", "embed", "--out", str(tmp_path / "t5.safetensors"), "pick up the cup"])
