"""T5 instruction embeddings, stored as bfloat16 in a safetensors file and read without torch.

The official runtime keeps `{instruction: Tensor(1, 512, 1024) bf16}` in a pickle (`*_t5_embeddings.pkl`,
CP `cosmos_utils.py` `init_t5_text_embeddings_cache`) and looks instructions up by exact string. Here the same
data lives in safetensors: tensors are named `embedding_<i>`, and `__metadata__` maps each tensor name to its
instruction (arbitrary text stays out of tensor names), plus a `format` tag. Every embedding is held as bfloat16
(the official embeddings are bf16, and the model casts whatever it gets to bf16); F32/F16 files are rounded on read.

The safetensors layout is parsed here with numpy, because numpy has no bfloat16 and `safetensors.numpy` cannot
return one: 8-byte little-endian header length, a JSON header, then the raw little-endian buffer.

Producing these files from the official pickle or with T5 needs torch: `models/text_encoder.py`.
"""

from __future__ import annotations

import difflib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np

from cosmos_edge.runtime.errors import CheckpointError, ConfigError, InputError
from cosmos_edge.runtime.files import starts_like_a_pickle, write_atomic
from cosmos_edge.runtime.policy.numerics import bf16_bits_to_float32, float32_to_bf16_bits

FORMAT_TAG = "cosmos-edge/text-embeddings/1"
# The official embeddings are T5's hidden states padded to 512 tokens (zeros past the text). The DiT attends to every
# token, padding included, so a store of another length would change every action.
TEXT_TOKENS = 512
_MAX_HEADER_BYTES = 100 << 20  # the limit the reference safetensors implementation uses
_ITEM_SIZES = {"BF16": 2, "F16": 2, "F32": 4}


_BF16_EXPONENT = np.uint16(0x7F80)  # all ones: NaN or infinity


@dataclass(frozen=True, eq=False)
class TextEmbeddings:
    """Read-only map from instruction to a bfloat16 embedding [1, tokens, dim], held as raw uint16 bits.

    Official embeddings are [1, 512, 1024]; every entry of one store has the same shape.
    """

    bf16_bits: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        frozen = {}
        for instruction, bits in self.bf16_bits.items():
            if not isinstance(instruction, str) or not isinstance(bits, np.ndarray) or bits.dtype != np.uint16:
                raise InputError(
                    f"text embeddings: expected str -> uint16 array of bf16 bits, got {instruction!r} -> "
                    f"{getattr(bits, 'dtype', type(bits).__name__)}"
                )
            if ((bits & _BF16_EXPONENT) == _BF16_EXPONENT).any():  # NaN or infinity: no encoder outputs them
                raise InputError(f"text embeddings: the embedding of {instruction!r} holds NaN or infinity")
            frozen[instruction] = bits.copy() if bits.flags.writeable else bits
            frozen[instruction].setflags(write=False)
        shapes = {bits.shape for bits in frozen.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 1:
            raise InputError(
                f"text embeddings: expected one or more entries of one shape [1, tokens, dim], got {shapes}"
            )
        object.__setattr__(self, "bf16_bits", MappingProxyType(frozen))

    @classmethod
    def from_arrays(cls, embeddings: Mapping[str, np.ndarray]) -> TextEmbeddings:
        """Rounds float embeddings [1, tokens, dim] to bfloat16 (ties to even, like `tensor.to(torch.bfloat16)`)."""
        return cls(
            {text: float32_to_bf16_bits(np.asarray(values, dtype=np.float32)) for text, values in embeddings.items()}
        )

    @property
    def instructions(self) -> tuple[str, ...]:
        return tuple(self.bf16_bits)

    @property
    def shape(self) -> tuple[int, ...]:
        return next(iter(self.bf16_bits.values())).shape

    def get(self, instruction: str, *, remedy: str = "") -> np.ndarray:
        """The embedding of exactly `instruction` as float32 [1, tokens, dim] (a new array, exact bf16 values). An
        unknown one is an InputError ending with `remedy` (default: `ADDING_AN_INSTRUCTION`)."""
        bits = self.bf16_bits.get(instruction)
        if bits is None:
            closest = difflib.get_close_matches(instruction, self.instructions, n=3, cutoff=0.0)
            raise InputError(
                f"instruction: no text embedding for {instruction!r} (lookup is by exact string, as in the official "
                f"runtime); closest of the {len(self.bf16_bits)} known: {closest}. {remedy or ADDING_AN_INSTRUCTION}",
                field="instruction",
            )
        return bf16_bits_to_float32(bits)


def read(path: str | Path) -> TextEmbeddings:
    """Reads a store written by `write` (BF16, F16 or F32 tensors; the latter two are rounded to bfloat16)."""
    path = Path(path)
    metadata, tensors = _read_safetensors(path)
    if metadata.get("format") != FORMAT_TAG:
        raise CheckpointError(f"{path}: expected __metadata__ format {FORMAT_TAG!r}, got {metadata.get('format')!r}")
    bits = {}
    for name, (dtype, array) in tensors.items():
        instruction = metadata.get(name)
        if instruction is None or instruction in bits:
            raise CheckpointError(f"{path}: tensor {name!r} has a missing or repeated instruction in __metadata__")
        bits[instruction] = array if dtype == "BF16" else float32_to_bf16_bits(array.astype(np.float32))
    try:
        return TextEmbeddings(bits)
    except InputError as error:  # no entries, or mixed shapes: the file's fault, not a request's
        raise CheckpointError(f"{path}: {error}") from None


def merge(stores: Mapping[str, TextEmbeddings]) -> TextEmbeddings:
    """One store holding every instruction of `stores` (named by where each came from, for errors). An instruction
    in several stores must have the same embedding in each; all must have one shape (`TextEmbeddings`)."""
    merged: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for name, store in stores.items():
        if merged and store.shape != (shape := next(iter(merged.values())).shape):
            first = next(iter(origin.values()))
            raise InputError(
                f"text embeddings {name}: shape {list(store.shape)}, but {first} holds shape {list(shape)}"
            )
        for instruction, bits in store.bf16_bits.items():
            if instruction in merged and not np.array_equal(merged[instruction], bits):
                raise InputError(
                    f"text embeddings {name}: {instruction!r} differs from its embedding in {origin[instruction]}"
                )
            merged.setdefault(instruction, bits)
            origin.setdefault(instruction, name)
    return TextEmbeddings(merged)


ADDING_AN_INSTRUCTION = (
    "Embed it into a new file with `cosmos-edge text-embeddings embed`, then `text-embeddings merge` that file with "
    "this store."
)


def check_token_count(store: TextEmbeddings, source: str | Path) -> None:
    """ConfigError naming `source` unless the store holds TEXT_TOKENS tokens per instruction."""
    tokens = store.shape[1]
    if tokens != TEXT_TOKENS:
        raise ConfigError(
            f"{source}: {tokens} tokens per instruction, expected {TEXT_TOKENS} (T5's output padded with zeros, as "
            "the official embeddings and `text-embeddings embed` write them): the DiT attends to every token, so "
            "another length would change every action"
        )


def check_fits_dit(store: TextEmbeddings, source: str | Path, checkpoint: Path, text_dim: int) -> None:
    """ConfigError naming `source` unless the store's embeddings are as wide and as long as the DiT `checkpoint`
    takes (`text_dim` wide, TEXT_TOKENS long)."""
    if store.shape[-1] != text_dim:
        raise ConfigError(
            f"{source}: {store.shape[-1]}-wide embeddings, but the DiT {checkpoint} takes {text_dim}-wide ones: are "
            "the two files of one model?"
        )
    check_token_count(store, source)


def write(path: str | Path, embeddings: Mapping[str, np.ndarray] | TextEmbeddings) -> None:
    """Writes instruction → embedding [1, tokens, dim] as bfloat16 safetensors (float inputs are rounded)."""
    store = embeddings if isinstance(embeddings, TextEmbeddings) else TextEmbeddings.from_arrays(embeddings)
    names = {instruction: f"embedding_{i}" for i, instruction in enumerate(store.instructions)}
    metadata = {"format": FORMAT_TAG, **{name: instruction for instruction, name in names.items()}}
    _write_safetensors(Path(path), {names[text]: bits for text, bits in store.bf16_bits.items()}, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, np.ndarray]]]:
    """Returns (__metadata__, {name: (dtype, array)}); BF16 arrays come back as uint16 bits."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read: {error}") from error
    if len(data) < 8:
        raise CheckpointError(f"{path}: not safetensors, expected at least 8 bytes, got {len(data)}")
    if data.startswith(b"PK\x03\x04"):
        raise CheckpointError(
            f"{path}: a zip archive (a PyTorch checkpoint or an .npz?), not a safetensors file of instruction "
            "embeddings; expected the output of `cosmos-edge text-embeddings`"
        )
    (header_size,) = struct.unpack("<Q", data[:8])
    if header_size > min(_MAX_HEADER_BYTES, len(data) - 8):
        if starts_like_a_pickle(data):  # a valid header length can open with a pickle's bytes too: not this one
            raise CheckpointError(
                f"{path}: a Python pickle (the official T5 embeddings file?), not a safetensors file of instruction "
                f"embeddings; convert it once: `cosmos-edge text-embeddings convert {path} OUT.safetensors "
                "--trust-pickle`"
            )
        raise CheckpointError(
            f"{path}: not a safetensors file of instruction embeddings (its 8-byte header length reads {header_size}, "
            f"beyond the file's {len(data)} bytes or 100 MiB); expected the output of `cosmos-edge text-embeddings`"
        )
    try:
        header = json.loads(data[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: safetensors header is not valid UTF-8 JSON: {error}") from error
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    buffer = memoryview(data)[8 + header_size :]
    return metadata, {name: _tensor_view(path, name, info, buffer) for name, info in header.items()}


def _tensor_view(path: Path, name: str, info: Any, buffer: memoryview) -> tuple[str, np.ndarray]:
    entry = info if isinstance(info, dict) else {}
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(dtype, str) and _int_list(shape) and _int_list(offsets) and len(offsets) == 2):
        raise CheckpointError(
            f"{path}: tensor {name!r}: malformed header entry {str(info)[:200]} (expected a dtype name, a shape and "
            "two data_offsets, as integers)"
        )
    begin, end = offsets
    if dtype not in _ITEM_SIZES:
        raise CheckpointError(f"{path}: tensor {name!r}: expected dtype in {sorted(_ITEM_SIZES)}, got {dtype!r}")
    expected = math.prod(shape) * _ITEM_SIZES[dtype]
    if not (0 <= begin <= end <= len(buffer) and end - begin == expected):
        raise CheckpointError(
            f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] do not hold {shape} {dtype} ({expected} bytes) "
            f"inside a {len(buffer)}-byte buffer"
        )
    numpy_dtype = {"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[dtype]
    return dtype, np.frombuffer(buffer[begin:end], dtype=numpy_dtype).reshape(shape)


def _int_list(value: object) -> TypeGuard[list[int]]:
    """A JSON list of integers from 0 (not booleans, not floats: the sizes and offsets of a safetensors header)."""
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def _write_safetensors(path: Path, bf16_tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, bits in bf16_tensors.items():
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
    encoded = json.dumps(header, ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # pad so the buffer starts 8-byte aligned, as the reference writer does
    tensors = [np.ascontiguousarray(bits, dtype="<u2").tobytes() for bits in bf16_tensors.values()]
    # Whole or not at all: a truncated file (a full disk) would be refused as existing by the next run.
    write_atomic(path, b"".join([struct.pack("<Q", len(encoded)), encoded, *tensors]))
