from __future__ import annotations

import collections
import json
import pickle
import re
import struct
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cosmos_edge.runtime.errors import CheckpointError, EngineError, InputError
from cosmos_edge.runtime.models import text_encoder
from cosmos_edge.runtime.policy import text_embeddings
from cosmos_edge.runtime.policy.numerics import round_to_bf16

INSTRUCTIONS = (
    "put both the alphabet soup and the tomato sauce in the basket",
    "open the top drawer and put the bowl inside",
    'turn on the stove — "carefully"\n(ünïcode, quotes, newline)',
)


def _embeddings(shape: tuple[int, ...] = (1, 8, 16), seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {text: rng.standard_normal(shape).astype(np.float32) for text in INSTRUCTIONS}


def test_write_read_is_bf16_exact(tmp_path: Path) -> None:
    source = _embeddings((1, 512, 1024))
    text_embeddings.write(tmp_path / "t5.safetensors", source)
    store = text_embeddings.read(tmp_path / "t5.safetensors")
    assert store.instructions == INSTRUCTIONS and store.shape == (1, 512, 1024)
    for text, values in source.items():
        out = store.get(text)
        assert out.dtype == np.float32 and out.shape == (1, 512, 1024)
        np.testing.assert_array_equal(out, torch.from_numpy(values).to(torch.bfloat16).float().numpy())


def test_file_is_standard_safetensors(tmp_path: Path) -> None:
    source = _embeddings()
    text_embeddings.write(tmp_path / "t5.safetensors", source)
    tensors = load_file(tmp_path / "t5.safetensors")
    header_size = struct.unpack("<Q", (tmp_path / "t5.safetensors").read_bytes()[:8])[0]
    header = json.loads((tmp_path / "t5.safetensors").read_bytes()[8 : 8 + header_size])
    assert header_size % 8 == 0
    assert header["__metadata__"]["format"] == text_embeddings.FORMAT_TAG
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16
        np.testing.assert_array_equal(tensor.float().numpy(), round_to_bf16(source[header["__metadata__"][name]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reads_f32_and_f16_files_rounding_to_bf16(tmp_path: Path, dtype: torch.dtype) -> None:
    source = _embeddings()
    names = {f"embedding_{i}": text for i, text in enumerate(source)}
    tensors = {name: torch.from_numpy(source[text]).to(dtype) for name, text in names.items()}
    save_file(tensors, tmp_path / "t5.safetensors", metadata={"format": text_embeddings.FORMAT_TAG, **names})
    store = text_embeddings.read(tmp_path / "t5.safetensors")
    for name, text in names.items():
        np.testing.assert_array_equal(store.get(text), tensors[name].to(torch.bfloat16).float().numpy())


def test_unknown_instruction_names_the_closest(tmp_path: Path) -> None:
    store = text_embeddings.TextEmbeddings.from_arrays(_embeddings())
    with pytest.raises(InputError, match=r"no text embedding for 'open the top drawer and put the bowl inside\.'.*"):
        store.get("open the top drawer and put the bowl inside.")
    with pytest.raises(InputError) as error:
        store.get("open the drawer")
    closest = str(error.value).split("closest of the 3 known: ")[1]
    assert closest.startswith("['open the top drawer and put the bowl inside'")


def test_store_is_read_only_and_checks_shapes() -> None:
    store = text_embeddings.TextEmbeddings.from_arrays(_embeddings())
    with pytest.raises(TypeError):
        store.bf16_bits["new"] = np.zeros((1, 8, 16), np.uint16)  # type: ignore[index]
    assert not store.bf16_bits[INSTRUCTIONS[0]].flags.writeable
    with pytest.raises(InputError, match="one shape"):
        text_embeddings.TextEmbeddings.from_arrays({"a": np.zeros((1, 8, 16)), "b": np.zeros((1, 4, 16))})
    with pytest.raises(InputError, match=r"\[1, tokens, dim\]"):
        text_embeddings.TextEmbeddings.from_arrays({"a": np.zeros((8, 16))})
    with pytest.raises(InputError, match="uint16"):
        text_embeddings.TextEmbeddings({"a": np.zeros((1, 8, 16), np.float32)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_an_embedding_holding_nan_or_infinity_is_refused_naming_the_file(tmp_path: Path, bad: float) -> None:
    broken = _embeddings()
    broken[INSTRUCTIONS[1]][0, 3, 5] = bad  # every query of it would make the DiT return NaN
    with pytest.raises(InputError, match=f"the embedding of {INSTRUCTIONS[1]!r} holds NaN or infinity"):
        text_embeddings.TextEmbeddings.from_arrays(broken)
    names = {f"embedding_{i}": text for i, text in enumerate(broken)}
    tensors = {name: torch.from_numpy(broken[text]) for name, text in names.items()}
    save_file(tensors, tmp_path / "t5.safetensors", metadata={"format": text_embeddings.FORMAT_TAG, **names})
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path / 't5.safetensors'))}: .* holds NaN"):
        text_embeddings.read(tmp_path / "t5.safetensors")


def test_pickle_is_refused_without_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "t5.pkl"
    path.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(CheckpointError, match=r"refused.*trust_pickle=True"):
        text_encoder.convert_official_pickle(path, tmp_path / "out.safetensors", trust_pickle=False)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("writer", ["pickle.dump", "torch.save"])
def test_convert_official_pickle(tmp_path: Path, writer: str) -> None:
    source = {text: torch.from_numpy(values).to(torch.bfloat16) for text, values in _embeddings((1, 512, 16)).items()}
    path = tmp_path / "t5.pkl"
    if writer == "pickle.dump":  # how the official save scripts write it
        with path.open("wb") as file:
            pickle.dump(source, file)
    else:
        torch.save(source, path)
    store = text_encoder.convert_official_pickle(path, tmp_path / "t5.safetensors", trust_pickle=True)
    reread = text_embeddings.read(tmp_path / "t5.safetensors")
    for text, tensor in source.items():
        np.testing.assert_array_equal(store.get(text), tensor.float().numpy())
        np.testing.assert_array_equal(reread.get(text), tensor.float().numpy())


def test_pickle_needing_other_globals_is_refused_even_when_trusted(tmp_path: Path) -> None:
    path = tmp_path / "t5.pkl"
    path.write_bytes(pickle.dumps({"a": collections.Counter()}, protocol=2))
    with pytest.raises(CheckpointError, match=r"needs collections\.Counter"):
        text_encoder.convert_official_pickle(path, tmp_path / "out.safetensors", trust_pickle=True)


def test_pickle_with_wrong_content(tmp_path: Path) -> None:
    path = tmp_path / "t5.pkl"
    path.write_bytes(pickle.dumps({"a": 1.0}))
    with pytest.raises(CheckpointError, match="expected str -> tensor entries, got str -> float"):
        text_encoder.convert_official_pickle(path, tmp_path / "out.safetensors", trust_pickle=True)


def test_pickle_of_unusable_shapes_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t5.pkl"
    path.write_bytes(pickle.dumps({"a": torch.zeros(512, 32, dtype=torch.bfloat16)}))  # no batch axis
    named = f"{path}: 1 of its 1 tensors are no [1, tokens, dim] instruction embedding (first: 'a' of shape [512, 32])"
    with pytest.raises(CheckpointError, match=re.escape(named)):
        text_encoder.convert_official_pickle(path, tmp_path / "out.safetensors", trust_pickle=True)


def test_embed_without_transformers_says_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(EngineError, match="optional package transformers"):
        text_encoder.embed_instructions(["pick up the cup"], tmp_path / "t5.safetensors")


class _Tokens:
    def __init__(self, length: int, max_length: int) -> None:
        self.input_ids = torch.arange(max_length)[None]
        self.attention_mask = (torch.arange(max_length) < length).long()[None]


class _T5Tokenizer:
    """Stands in for transformers' T5TokenizerFast: one token per word, and records how it was asked."""

    asked: ClassVar[list[dict[str, object]]] = []

    @classmethod
    def from_pretrained(cls, model: str) -> _T5Tokenizer:
        return cls()

    def __call__(self, texts: list[str], **options: object) -> _Tokens:
        self.asked.append(options)
        return _Tokens(len(texts[0].split()), int(options["max_length"]))  # type: ignore[call-overload]


class _T5Encoder(torch.nn.Module):
    """Stands in for T5EncoderModel: hidden states that are not zero past the true length, nor bf16 values."""

    dim = 6

    @classmethod
    def from_pretrained(cls, model: str, use_safetensors: bool) -> _T5Encoder:
        return cls()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        hidden = torch.linspace(-1.0, 1.0, input_ids.shape[1] * self.dim).reshape(1, -1, self.dim) + 1e-3
        return type("Output", (), {"last_hidden_state": hidden})


def test_embedding_pads_to_512_tokens_zeroes_past_the_true_length_and_rounds_to_bf16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The official get_t5_emb.py: padding="max_length" to 512 (truncating), hidden states past the length zeroed.
    stand_in = type(sys)("transformers")
    stand_in.T5TokenizerFast, stand_in.T5EncoderModel = _T5Tokenizer, _T5Encoder  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", stand_in)
    _T5Tokenizer.asked.clear()
    store = text_encoder.embed_instructions(["pick up the cup"], tmp_path / "t5.safetensors", device="cpu")
    assert _T5Tokenizer.asked == [
        {"return_tensors": "pt", "truncation": True, "padding": "max_length", "max_length": 512}
    ]
    embedding = text_embeddings.read(tmp_path / "t5.safetensors").get("pick up the cup")
    assert embedding.shape == (1, 512, _T5Encoder.dim) and store.shape == embedding.shape
    hidden = _T5Encoder()(torch.zeros(1, 512), torch.zeros(1, 512)).last_hidden_state.numpy()  # type: ignore[attr-defined]
    np.testing.assert_array_equal(embedding[0, :4], round_to_bf16(hidden[0, :4]))  # 4 words: 4 tokens kept
    assert not embedding[0, 4:].any()


def test_an_encoder_returning_nan_is_a_run_failure_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Overflowing(_T5Encoder):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
            hidden = torch.full((1, input_ids.shape[1], self.dim), float("nan"))
            return type("Output", (), {"last_hidden_state": hidden})

    stand_in = type(sys)("transformers")
    stand_in.T5TokenizerFast, stand_in.T5EncoderModel = _T5Tokenizer, Overflowing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "transformers", stand_in)
    with pytest.raises(EngineError, match="the T5 encoder returned NaN or infinity for 'pick up the cup'"):
        text_encoder.embed_instructions(["pick up the cup"], tmp_path / "t5.safetensors", device="cpu")
    assert not (tmp_path / "t5.safetensors").exists()


def _corrupt(tmp_path: Path, header: dict, buffer: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + buffer)
    return path


@pytest.mark.parametrize(
    ("header", "buffer", "message"),
    [
        ({"__metadata__": {"format": "other"}}, b"", "expected __metadata__ format"),
        (
            {
                "__metadata__": {"format": text_embeddings.FORMAT_TAG},
                "embedding_0": {"dtype": "BF16", "shape": [1, 2, 2], "data_offsets": [0, 8]},
            },
            b"\0" * 6,
            r"data_offsets \[0, 8\] do not hold \[1, 2, 2\] BF16",
        ),
        (
            {
                "__metadata__": {"format": text_embeddings.FORMAT_TAG},
                "embedding_0": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]},
            },
            b"\0",
            "expected dtype in",
        ),
        (
            {
                "__metadata__": {"format": text_embeddings.FORMAT_TAG},
                "embedding_0": {"dtype": "BF16", "shape": [1, 1, 1], "data_offsets": [0, 2]},
            },
            b"\0\0",
            "missing or repeated instruction",
        ),
        ({"__metadata__": {"format": 3}}, b"", "must map strings to strings"),
        *(
            (
                {"__metadata__": {"format": text_embeddings.FORMAT_TAG}, "embedding_0": entry},
                b"\0\0",
                r"tensor 'embedding_0': malformed header entry .*expected a dtype name, a shape and two data_offsets",
            )
            for entry in (
                {"dtype": "BF16", "shape": [1, 1, 1], "data_offsets": ["0", "2"]},
                {"dtype": "BF16", "shape": [1, 1, 1], "data_offsets": [0.0, 2.0]},
                {"dtype": ["BF16"], "shape": [1, 1, 1], "data_offsets": [0, 2]},
                {"dtype": "BF16", "shape": [1, True, 1], "data_offsets": [0, 2]},
                {"dtype": "BF16", "shape": [1, 1, 1], "data_offsets": [0, 1, 2]},
                [0, 2],
            )
        ),
        (
            {"__metadata__": {"format": text_embeddings.FORMAT_TAG}},
            b"",
            r"bad.safetensors: text embeddings: expected one or more entries of one shape \[1, tokens, dim\], got",
        ),
        (
            {
                "__metadata__": {"format": text_embeddings.FORMAT_TAG, "embedding_0": "a", "embedding_1": "b"},
                "embedding_0": {"dtype": "BF16", "shape": [1, 1, 1], "data_offsets": [0, 2]},
                "embedding_1": {"dtype": "BF16", "shape": [1, 1, 2], "data_offsets": [2, 6]},
            },
            b"\0" * 6,
            r"bad.safetensors: text embeddings: expected one or more entries of one shape",
        ),
    ],
)
def test_malformed_files_are_rejected(tmp_path: Path, header: dict, buffer: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        text_embeddings.read(_corrupt(tmp_path, header, buffer))


def test_truncated_files_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x00")
    with pytest.raises(CheckpointError, match="at least 8 bytes"):
        text_embeddings.read(path)
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(
        CheckpointError, match=r"not a safetensors file of instruction embeddings \(its 8-byte header length reads 1000"
    ):
        text_embeddings.read(path)
    with pytest.raises(CheckpointError, match="cannot read"):
        text_embeddings.read(tmp_path / "absent.safetensors")
    path.write_bytes(pickle.dumps({"fold the shirt": [0.0]}, protocol=2))  # the official embeddings' format
    with pytest.raises(CheckpointError, match=r"a Python pickle .* `cosmos-edge text-embeddings convert .*short"):
        text_embeddings.read(path)


def test_a_store_whose_header_length_opens_like_a_pickle_reads(tmp_path: Path) -> None:
    # Header lengths of 640 + 65536 k bytes begin 80 02, as a protocol 2 pickle does.
    for length in range(400, 600):
        path = tmp_path / "store.safetensors"
        text_embeddings.write(path, {"x" * length: np.zeros((1, 2, 3), np.float32)})
        if path.read_bytes()[:2] == b"\x80\x02":
            assert text_embeddings.read(path).instructions == ("x" * length,)
            return
    pytest.fail("no instruction length gave a header length opening with 80 02")
