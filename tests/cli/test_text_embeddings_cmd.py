from __future__ import annotations

import argparse
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cosmos_edge.cli import text_embeddings_cmd
from cosmos_edge.runtime.errors import CheckpointError, ConfigError, EngineError, InputError
from cosmos_edge.runtime.policy import text_embeddings


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cosmos-edge")
    text_embeddings_cmd.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def _official_pickle(path: Path) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    source = {
        text: torch.from_numpy(rng.standard_normal((1, 512, 16)).astype(np.float32)).to(torch.bfloat16)
        for text in ("pick up the cup", "stack the blocks")
    }
    with path.open("wb") as file:
        pickle.dump(source, file)
    return source


def test_convert_then_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _official_pickle(tmp_path / "t5.pkl")
    out = tmp_path / "t5.safetensors"
    assert _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(out), "--trust-pickle"]) == 0
    assert "wrote the embeddings of 2 instructions, each [1, 512, 16], to" in capsys.readouterr().out
    np.testing.assert_array_equal(text_embeddings.read(out).get("pick up the cup"), source["pick up the cup"].float())

    assert _run(["text-embeddings", "list", str(out)]) == 0
    assert capsys.readouterr().out.splitlines() == ["pick up the cup", "stack the blocks"]


def test_convert_needs_trust_pickle(tmp_path: Path) -> None:
    _official_pickle(tmp_path / "t5.pkl")
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(tmp_path / "t5.safetensors")])


def test_convert_refuses_an_empty_file_and_a_store_it_wrote_in_one_line(tmp_path: Path) -> None:
    _official_pickle(tmp_path / "t5.pkl")
    store = tmp_path / "t5.safetensors"
    _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(store), "--trust-pickle"])
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "truncated.pkl").write_bytes((tmp_path / "t5.pkl").read_bytes()[:100])
    cases = {
        "empty.pkl": "empty.pkl: the file is empty; expected the official *_t5_embeddings.pkl",
        # torch.load reads a safetensors file too: converted, its instructions would be lost.
        "t5.safetensors": "t5.safetensors: already a safetensors file (a store this project writes",
        "truncated.pkl": "truncated.pkl: not a readable pickle",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError) as raised:
            _run(
                [
                    "text-embeddings",
                    "convert",
                    str(tmp_path / name),
                    str(tmp_path / "out.safetensors"),
                    "--trust-pickle",
                ]
            )
        assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_embed_reports_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(EngineError, match=r"needs transformers .*cosmos-edge\[t5\]"):  # before the default device
        _run(["text-embeddings", "embed", "--out", str(tmp_path / "t5.safetensors"), "the cup"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_embed_refuses_a_device_torch_cannot_use_before_loading_the_encoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", types.SimpleNamespace())  # installed, as far as the check goes
    with pytest.raises(ConfigError, match="--device"):  # the default cuda, on a CPU-only torch: not after 45 GB
        _run(["text-embeddings", "embed", "--out", str(tmp_path / "t5.safetensors"), "pick up the cup"])


def test_embed_names_a_model_that_cannot_be_loaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Unreachable:  # as transformers' from_pretrained for a name that is no folder and not on the Hub
        @classmethod
        def from_pretrained(cls, name: str, **kwargs: object) -> None:
            raise OSError(f"{name} is not a local folder and is not a valid model identifier")

    transformers = types.SimpleNamespace(T5EncoderModel=Unreachable, T5TokenizerFast=Unreachable)
    monkeypatch.setitem(sys.modules, "transformers", transformers)
    out = tmp_path / "t5.safetensors"
    with pytest.raises(CheckpointError, match="model 'google-t5/t5-11bb': cannot load the T5 encoder: google-t5"):
        _run(["text-embeddings", "embed", "--out", str(out), "--device", "cpu", "--model", "google-t5/t5-11bb", "x"])


def test_embed_on_a_device_too_small_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class TooLarge:  # loads, then cannot be moved onto the device
        @classmethod
        def from_pretrained(cls, name: str, **kwargs: object) -> TooLarge:
            return cls()

        def to(self, **kwargs: object) -> None:
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setitem(
        sys.modules, "transformers", types.SimpleNamespace(T5EncoderModel=TooLarge, T5TokenizerFast=TooLarge)
    )
    with pytest.raises(EngineError, match="device cpu: out of memory for the T5 encoder 'google-t5/t5-11b'"):
        _run(["text-embeddings", "embed", "--out", str(tmp_path / "t5.safetensors"), "--device", "cpu", "x"])


def test_merge_joins_stores_and_never_replaces_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    shared = rng.standard_normal((1, 512, 16)).astype(np.float32)
    first = {"pick up the cup": shared, "stack the blocks": rng.standard_normal((1, 512, 16)).astype(np.float32)}
    second = {"pick up the cup": shared, "open the drawer": rng.standard_normal((1, 512, 16)).astype(np.float32)}
    text_embeddings.write(tmp_path / "a.safetensors", first)
    text_embeddings.write(tmp_path / "b.safetensors", second)
    out = tmp_path / "ab.safetensors"
    stores = [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")]
    assert _run(["text-embeddings", "merge", *stores, "--out", str(out)]) == 0
    assert "wrote the embeddings of 3 instructions, each [1, 512, 16], to" in capsys.readouterr().out
    merged = text_embeddings.read(out)
    assert merged.instructions == ("pick up the cup", "stack the blocks", "open the drawer")
    for name, store in (("a", first), ("b", second)):
        written = text_embeddings.read(tmp_path / f"{name}.safetensors")
        for instruction in store:
            np.testing.assert_array_equal(merged.get(instruction), written.get(instruction))
    with pytest.raises(ConfigError, match="exists, and is never replaced"):
        _run(["text-embeddings", "merge", str(tmp_path / "a.safetensors"), "--out", str(out)])


def test_merge_refuses_an_instruction_embedded_two_ways(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    for name in ("a", "b"):
        text_embeddings.write(tmp_path / f"{name}.safetensors", {"pick up the cup": rng.standard_normal((1, 8, 16))})
    stores = {name: text_embeddings.read(tmp_path / f"{name}.safetensors") for name in ("a", "b")}
    with pytest.raises(InputError, match="text embeddings b: 'pick up the cup' differs from its embedding in a"):
        text_embeddings.merge(stores)


def test_convert_never_replaces_a_file(tmp_path: Path) -> None:
    _official_pickle(tmp_path / "t5.pkl")
    out = tmp_path / "t5.safetensors"
    out.write_bytes(b"the converted official store")
    with pytest.raises(ConfigError, match=r"t5\.safetensors \(OUT\.safetensors\): exists, and is never replaced"):
        _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(out), "--trust-pickle"])
    assert out.read_bytes() == b"the converted official store"


def test_stores_of_another_token_count_are_refused_where_they_are_made(tmp_path: Path) -> None:
    short = {"pick up the cup": torch.zeros((1, 77, 16), dtype=torch.bfloat16)}
    with (tmp_path / "t5.pkl").open("wb") as file:
        pickle.dump(short, file)
    out = tmp_path / "t5.safetensors"
    with pytest.raises(ConfigError, match=r"t5\.pkl: 77 tokens per instruction, expected 512"):
        _run(["text-embeddings", "convert", str(tmp_path / "t5.pkl"), str(out), "--trust-pickle"])
    assert not out.exists()
    text_embeddings.write(tmp_path / "short.safetensors", {"open the drawer": np.zeros((1, 77, 16), np.float32)})
    with pytest.raises(ConfigError, match=r"short\.safetensors: 77 tokens per instruction, expected 512"):
        _run(
            ["text-embeddings", "merge", str(tmp_path / "short.safetensors"), "--out", str(tmp_path / "m.safetensors")]
        )
