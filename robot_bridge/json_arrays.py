"""json_numpy's array encoding, which the official Cosmos Policy server and client use over HTTP, read strictly.

`json_numpy.patch()` makes `json` write a numpy array (or scalar, with shape []) as
`{"__numpy__": base64 of its C-order bytes, "dtype": numpy's descr such as "<f8" or "|u1", "shape": [...]}`.
Reading is deferred: `parse_json` leaves each such object as an `EncodedArray`, and `to_array` decodes one when its
field is read, so an error names the field and arrays in fields nobody reads are never decoded. Only the dtypes in
`DTYPES` are accepted: no object arrays (which could only be rebuilt by unpickling), no structured ones. Plain nested
lists of numbers, which the official server also takes, are accepted where an array is expected.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cosmos_edge.robot_bridge.wire import MAX_DIM, invalid

# What the official client sends (uint8 images, float64 or float32 proprio) and what the server answers (float32).
DTYPES: Mapping[str, np.dtype[Any]] = {name: np.dtype(name) for name in ("|u1", "<f4", "<f8")}
MAX_DIMS = 4
_KEYS = frozenset({"__numpy__", "dtype", "shape"})


@dataclass(frozen=True, eq=False)
class EncodedArray:
    """A json_numpy object as received, not yet decoded or checked."""

    fields: Mapping[str, object]


def _hook(fields: dict[str, Any]) -> object:
    # The marker key alone decides, as in json_numpy; the other keys are checked when the array is read.
    return EncodedArray(fields) if "__numpy__" in fields else fields


# A decoder and encoders of our own: `json.loads`/`json.dumps` may be patched process-wide by json_numpy itself.
_DECODER = json.JSONDecoder(object_hook=_hook)


def parse_json(text: str) -> object:
    """Parses JSON text; json_numpy objects become `EncodedArray`. Raises `ValueError` for text that is not JSON,
    that nests too deeply for the parser, or holds an integer too long for Python to read."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError:
        raise
    except ValueError:  # the only other: Python's limit on the digits of an int, whose text tells to raise the limit
        raise ValueError(f"a number too long (an integer of more than {sys.get_int_max_str_digits()} digits)") from None


def to_array(value: object, field: str, dtypes: Collection[str] = tuple(DTYPES)) -> np.ndarray:
    """The array in `value`: a json_numpy object (of one of `dtypes`, among `DTYPES`) or a rectangular nested list of
    numbers. Raises `MessageError` naming `field`. A decoded json_numpy array is a read-only view of its bytes."""
    if isinstance(value, EncodedArray):
        return _decode(value.fields, field, dtypes)
    if isinstance(value, list):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged nesting
            raise invalid(field, "expected a rectangular nested list of numbers") from None
        if array.dtype.kind not in "iuf" or array.ndim > MAX_DIMS:
            raise invalid(field, f"expected a nested list of numbers, got {array.dtype} with {array.ndim} levels")
        return array
    got = type(value).__name__
    raise invalid(field, f"expected a json_numpy array ({{'__numpy__', 'dtype', 'shape'}}) or a list, got {got}")


def _decode(fields: Mapping[str, object], field: str, dtypes: Collection[str]) -> np.ndarray:
    if set(fields) != _KEYS:
        raise invalid(field, f"expected a json_numpy array with keys {sorted(_KEYS)}, got {sorted(fields)}")
    descr, shape, data = fields["dtype"], fields["shape"], fields["__numpy__"]
    dtype = DTYPES.get(descr) if isinstance(descr, str) and descr in dtypes else None
    if dtype is None:
        raise invalid(field, f"expected dtype one of {list(dtypes)}, got {descr!r}")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(side) is int and 0 <= side <= MAX_DIM for side in shape)
    ):
        raise invalid(field, f"expected a shape of at most {MAX_DIMS} sizes in 0..{MAX_DIM}, got {shape!r}")
    if not isinstance(data, str):
        raise invalid(field, f"expected base64 text in '__numpy__', got {type(data).__name__}")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII text
        raise invalid(field, "expected base64 text in '__numpy__'") from None
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise invalid(field, f"expected {expected} bytes for {descr} {shape}, got {len(raw)}")
    return np.frombuffer(raw, dtype).reshape(shape)


def encode_array(array: np.ndarray) -> dict[str, object]:
    """`array` as json_numpy writes it. Only `DTYPES` are written, so that our own reader accepts what we write."""
    contiguous = np.ascontiguousarray(array)
    if contiguous.dtype.str not in DTYPES:
        raise TypeError(f"array: expected dtype one of {list(DTYPES)}, got {contiguous.dtype.str}")
    return {
        "__numpy__": base64.b64encode(contiguous.data).decode("ascii"),
        "dtype": contiguous.dtype.str,
        "shape": list(contiguous.shape),
    }


def _default(value: object) -> object:
    if isinstance(value, np.ndarray):
        return encode_array(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# Separators: starlette's JSONResponse (the official server's outer JSON) is compact; json_numpy.dumps is not.
COMPACT = json.JSONEncoder(default=_default, allow_nan=False, separators=(",", ":"))
SPACED = json.JSONEncoder(default=_default, allow_nan=False)
