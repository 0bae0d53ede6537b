"""Framing of the bridge protocol: how a message becomes ZeroMQ frames and back, and the checks on its values.

A message is one multipart ZeroMQ message. Frame 0 is a msgpack header: `kind`, `protocol_version`, `request_id`,
`fields` (scalars, strings, small lists) and `arrays`, a list of {name, dtype, shape} descriptors. Frames 1..n are
the raw bytes of C-contiguous little-endian numpy arrays, one per descriptor. Images therefore never pass through
msgpack: they are sent from the caller's buffer (ZeroMQ zero-copy) and decoded as read-only views of the received
frame. Nothing is pickled, and only allowlisted dtypes are accepted, so a peer can at most make us hold numbers.

`parse` checks everything about the framing (sizes, frame count, header shape, descriptors against buffers) and
raises `MessageError` with an `ErrorCode` and the field at fault. The message types in `protocol` build on it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np
import zmq

from cosmos_edge.runtime.errors import ConfigError, ProtocolError

PROTOCOL_VERSION = 1

FrameLike = bytes | bytearray | memoryview | zmq.Frame
OutFrame = bytes | memoryview

UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1
MAX_NAME = 64
MAX_LIST = 1024
MAX_DIM = 4096  # image side, vector length

# Little-endian on the wire; a big-endian host would have to byte-swap, which none of our targets are.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}
_WIRE_NAMES: dict[np.dtype[Any], str] = {dtype: name for name, dtype in _WIRE_DTYPES.items()}
_HEADER_KEYS = frozenset({"kind", "protocol_version", "request_id", "fields", "arrays"})
_DESCRIPTOR_KEYS = frozenset({"name", "dtype", "shape"})


class MessageKind(str, Enum):
    ACT = "act"
    METADATA = "metadata"
    PING = "ping"
    SET_MODE = "set_mode"
    ACT_RESULT = "act_result"
    METADATA_RESULT = "metadata_result"
    PONG = "pong"
    MODE_SET = "mode_set"
    ERROR = "error"


class ErrorCode(str, Enum):
    MALFORMED = "malformed"  # the frames or the header cannot be parsed
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_KIND = "unknown_kind"
    INVALID_FIELD = "invalid_field"  # a field or array has the wrong type, dtype, shape or value
    TOO_LARGE = "too_large"
    INVALID_INPUT = "invalid_input"  # the policy rejected the request, e.g. an instruction it has no embedding for
    UNKNOWN_MODE = "unknown_mode"
    SUPERSEDED = "superseded"  # a newer observation from the same controller replaced this one before it ran
    OVERLOADED = "overloaded"  # too many controllers are waiting
    EXPIRED = "expired"  # the request's deadline passed before it could start; it was not computed
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"  # the policy failed; the server log has the details


# The request itself was wrong: sent again unchanged, it fails again (the others are the server's state or failure).
REQUEST_FAULTS = frozenset(
    {ErrorCode.INVALID_FIELD, ErrorCode.INVALID_INPUT, ErrorCode.UNKNOWN_MODE, ErrorCode.TOO_LARGE}
)


class MessageError(ProtocolError):
    """A message failed to parse or validate. `request_id` is set once the header was readable."""

    def __init__(self, code: ErrorCode, field: str, detail: str, request_id: int | None = None) -> None:
        super().__init__(f"{field}: {detail}" if field else detail)
        self.code = code
        self.field = field
        self.detail = detail
        self.request_id = request_id


_LARGEST_MESSAGE_BYTES = 2**32  # 4 GiB: far above any observation, far below libzmq's C integer


@dataclass(frozen=True)
class WireLimits:
    """Bounds on what a peer may make us parse. libzmq checks each frame against `max_message_bytes`; the rest is
    checked once a message has arrived whole (docs/protocol.md, Limits). An ALOHA observation is about 0.45 MB."""

    max_message_bytes: int = 16 * 2**20
    max_array_bytes: int = 4 * 2**20
    max_header_bytes: int = 256 * 2**10
    max_arrays: int = 16

    def __post_init__(self) -> None:
        for name in ("max_message_bytes", "max_array_bytes", "max_header_bytes", "max_arrays"):
            if not 1 <= getattr(self, name) <= _LARGEST_MESSAGE_BYTES:
                raise ConfigError(
                    f"{name}: expected an integer in 1..{_LARGEST_MESSAGE_BYTES}, got {getattr(self, name)}"
                )
        if self.max_array_bytes > self.max_message_bytes or self.max_header_bytes > self.max_message_bytes:
            raise ConfigError(
                f"max_array_bytes ({self.max_array_bytes}) and max_header_bytes ({self.max_header_bytes}) "
                f"must not exceed max_message_bytes ({self.max_message_bytes})"
            )


# --- value checks, shared by locally built and decoded messages -------------------------------------------------


def invalid(field: str, detail: str) -> MessageError:
    return MessageError(ErrorCode.INVALID_FIELD, field, detail)


def set_field(message: object, name: str, value: object) -> None:
    object.__setattr__(message, name, value)  # normalising a field of a frozen dataclass in __post_init__


def check_int(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise invalid(field, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise invalid(field, f"expected {lo}..{hi}, got {value}")
    return int(value)


def check_float(field: str, value: object, lo: float = -math.inf, hi: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise invalid(field, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not (math.isfinite(number) and lo <= number <= hi):
        raise invalid(field, f"expected a finite number in [{lo}, {hi}], got {number}")
    return number


def check_text(field: str, value: object, max_len: int, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise invalid(field, f"expected a string, got {type(value).__name__}")
    if len(value) > max_len or (not value and not allow_empty):
        raise invalid(field, f"expected {0 if allow_empty else 1}..{max_len} characters, got {len(value)}")
    return value


def check_sequence(field: str, value: object, max_items: int) -> Sequence[object]:
    if not isinstance(value, list | tuple):
        raise invalid(field, f"expected a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise invalid(field, f"expected at most {max_items} items, got {len(value)}")
    return value


def check_texts(field: str, value: object, max_len: int = MAX_NAME) -> tuple[str, ...]:
    return tuple(check_text(field, item, max_len) for item in check_sequence(field, value, MAX_LIST))


def check_optional_int(field: str, value: object, lo: int, hi: int) -> int | None:
    return None if value is None else check_int(field, value, lo, hi)


def check_array(field: str, value: object, dtype: str, ndim: int) -> np.ndarray:
    if not isinstance(value, np.ndarray):
        raise invalid(field, f"expected a numpy array, got {type(value).__name__}")
    if value.dtype != _WIRE_DTYPES[dtype]:
        raise invalid(field, f"expected dtype {dtype}, got {value.dtype}")
    if value.ndim != ndim or not all(1 <= side <= MAX_DIM for side in value.shape):
        dimensions = "1 dimension" if ndim == 1 else f"{ndim} dimensions"
        raise invalid(field, f"expected {dimensions}, each of 1..{MAX_DIM}, got shape {value.shape}")
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        raise invalid(field, "expected finite values, got NaN or infinity")
    return value


def wire_proprio(proprio: object) -> np.ndarray:
    """`proprio` as an `act` carries it, 1-D float32 and finite (a float64 qpos is cast, as the official server
    does); `MessageError` naming `proprio` otherwise."""
    try:
        array = np.asarray(proprio)
    except ValueError as error:  # a ragged sequence
        raise invalid("proprio", f"expected numbers, got {type(proprio).__name__} ({error})") from None
    if array.dtype.kind not in "iuf":
        raise invalid("proprio", f"expected numbers, got dtype {array.dtype}")
    with np.errstate(over="ignore"):
        cast = array.astype(np.float32)
    if array.dtype.kind == "f" and array.size and np.isfinite(array).all() and not np.isfinite(cast).all():
        raise invalid("proprio", f"expected values within float32's range, got {np.abs(array).max():g}")
    return check_array("proprio", cast, "float32", 1)


# --- framing -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    kind: MessageKind
    request_id: int
    fields: dict[str, Any]
    arrays: dict[str, np.ndarray]


class FieldTaker:
    """Hands out named entries once each, so that whatever is left over can be rejected as unknown."""

    def __init__(self, entries: Mapping[str, Any], what: str) -> None:
        self._entries = dict(entries)
        self._what = what
        self._taken: list[str] = []

    def take(self, name: str, *, required: bool = True) -> Any:
        self._taken.append(name)
        if name not in self._entries and required:
            raise invalid(name, f"missing {self._what}")
        return self._entries.pop(name, None)

    def take_prefixed(self, prefix: str) -> dict[str, Any]:
        names = [name for name in self._entries if name.startswith(prefix)]
        self._taken.append(f"{prefix}*")
        return {name.removeprefix(prefix): self._entries.pop(name) for name in names}

    def finish(self) -> None:
        if self._entries:
            name = next(iter(self._entries))
            raise invalid(name, f"unknown {self._what}; expected only {self._taken}")


def encode(kind: MessageKind, request_id: int, fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> list[OutFrame]:
    descriptors: list[dict[str, Any]] = []
    frames: list[OutFrame] = []
    for name, array in arrays.items():
        contiguous = np.ascontiguousarray(array)  # no copy for a C-contiguous array, the normal case
        descriptors.append({"name": name, "dtype": _WIRE_NAMES[contiguous.dtype], "shape": list(contiguous.shape)})
        frames.append(contiguous.reshape(-1).view(np.uint8).data)  # a flat byte view of the caller's buffer
    header = {
        "kind": kind.value,
        "protocol_version": PROTOCOL_VERSION,
        "request_id": request_id,
        "fields": fields,
        "arrays": descriptors,
    }
    return [msgpack.packb(header, use_bin_type=True), *frames]


def _byte_view(frame: FrameLike) -> memoryview:
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def _string_keyed(pairs: list[tuple[object, Any]]) -> dict[str, Any]:
    """Every map of a header, nested ones included: its keys name fields, so they must be strings."""
    for key, _ in pairs:
        if not isinstance(key, str):
            detail = f"expected map keys that are strings, got a {type(key).__name__} key {key!r:.40}"
            raise MessageError(ErrorCode.MALFORMED, "header", detail)
    return dict(pairs)  # type: ignore[arg-type]  # checked above


def _unpack_header(view: memoryview) -> dict[str, Any]:
    try:
        header = msgpack.unpackb(view, raw=False, strict_map_key=True, max_ext_len=0, object_pairs_hook=_string_keyed)
    except MessageError:  # a map key that is not a string (`_string_keyed`): already the answer
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:  # msgpack raises all three on bad input
        detail = f"expected a msgpack map, got bytes msgpack cannot read ({str(error) or type(error).__name__})"
        raise MessageError(ErrorCode.MALFORMED, "header", detail) from None
    if not isinstance(header, dict):
        raise MessageError(ErrorCode.MALFORMED, "header", f"expected a msgpack map, got {type(header).__name__}")
    return header


def parse(frames: Sequence[FrameLike], limits: WireLimits, kinds: Collection[MessageKind]) -> Envelope:
    """The envelope of a message's frames, one of `kinds` (a kind the reader does not take is refused naming them).
    The (bounded) header is read first, so that every later refusal, the frame count and the total size included,
    carries the request id its sender waits for."""
    expected_frames = f"expected 1..{limits.max_arrays + 1}"
    if not frames:
        raise MessageError(ErrorCode.MALFORMED, "frames", f"{expected_frames}, got 0")
    header_view = _byte_view(frames[0])
    if header_view.nbytes > limits.max_header_bytes:
        raise MessageError(
            ErrorCode.TOO_LARGE, "header", f"expected <= {limits.max_header_bytes} bytes, got {header_view.nbytes}"
        )
    header = _unpack_header(header_view)
    request_id = check_int("request_id", header.get("request_id"), 0, UINT64_MAX)
    try:
        _check_version(header)  # first: a newer sender's header may hold more frames, or keys this version lacks
        if len(frames) > limits.max_arrays + 1:
            raise MessageError(ErrorCode.TOO_LARGE, "frames", f"{expected_frames}, got {len(frames)}")
        views = [_byte_view(frame) for frame in frames[1:]]
        total = header_view.nbytes + sum(view.nbytes for view in views)
        if total > limits.max_message_bytes:
            detail = f"expected <= {limits.max_message_bytes} bytes, got {total}"
            raise MessageError(ErrorCode.TOO_LARGE, "message", detail)
        return _parse_header(header, request_id, views, limits, kinds)
    except MessageError as error:
        error.request_id = request_id
        raise


def _parse_header(
    header: dict[str, Any], request_id: int, views: list[memoryview], limits: WireLimits, kinds: Collection[MessageKind]
) -> Envelope:
    unknown = sorted(set(header) - _HEADER_KEYS)
    if unknown:
        raise invalid(f"header.{unknown[0]}", f"unknown header key; expected only {sorted(_HEADER_KEYS)}")
    kind = next((kind for kind in kinds if kind.value == header.get("kind")), None)
    if kind is None:
        detail = f"expected one of {[kind.value for kind in kinds]}, got {header.get('kind')!r}"
        raise MessageError(ErrorCode.UNKNOWN_KIND, "kind", detail)
    fields = header.get("fields")
    if not isinstance(fields, dict):
        raise MessageError(ErrorCode.MALFORMED, "fields", f"expected a map, got {type(fields).__name__}")
    return Envelope(kind, request_id, fields, _parse_arrays(header.get("arrays"), views, limits))


def _check_version(header: dict[str, Any]) -> None:
    if "protocol_version" not in header:
        detail = f"missing from the header; expected the integer {PROTOCOL_VERSION}"
        raise MessageError(ErrorCode.UNSUPPORTED_VERSION, "protocol_version", detail)
    version = header["protocol_version"]
    # An exact type check: msgpack keeps 1.0 a float, and True a bool, though both compare equal to 1.
    if type(version) is not int or version != PROTOCOL_VERSION:
        got = f"{type(version).__name__} {version!r}"
        detail = f"expected the integer {PROTOCOL_VERSION}, got {got}; upgrade the older side"
        raise MessageError(ErrorCode.UNSUPPORTED_VERSION, "protocol_version", detail)


def _parse_arrays(descriptors: object, views: list[memoryview], limits: WireLimits) -> dict[str, np.ndarray]:
    if not isinstance(descriptors, list):
        raise MessageError(ErrorCode.MALFORMED, "arrays", f"expected a list, got {type(descriptors).__name__}")
    if len(descriptors) != len(views):
        raise MessageError(
            ErrorCode.MALFORMED, "arrays", f"header describes {len(descriptors)} arrays, got {len(views)} array frames"
        )
    arrays: dict[str, np.ndarray] = {}
    for descriptor, view in zip(descriptors, views, strict=True):
        name, dtype, shape = _parse_descriptor(descriptor)
        if name in arrays:
            raise invalid(name, "array named twice")
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > limits.max_array_bytes:
            raise MessageError(ErrorCode.TOO_LARGE, name, f"expected <= {limits.max_array_bytes} bytes, got {nbytes}")
        if view.nbytes != nbytes:
            raise invalid(name, f"expected {nbytes} bytes for {_WIRE_NAMES[dtype]}{list(shape)}, got {view.nbytes}")
        array = np.frombuffer(view, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)
        array.flags.writeable = False  # a view of the received frame: nobody downstream may write into it
        arrays[name] = array
    return arrays


def _parse_descriptor(descriptor: object) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not isinstance(descriptor, dict) or set(descriptor) != _DESCRIPTOR_KEYS:
        raise MessageError(ErrorCode.MALFORMED, "arrays", f"expected maps with keys {sorted(_DESCRIPTOR_KEYS)}")
    name = check_text("arrays.name", descriptor["name"], 2 * MAX_NAME)
    dtype = _WIRE_DTYPES.get(descriptor["dtype"]) if isinstance(descriptor["dtype"], str) else None
    if dtype is None:
        raise invalid(name, f"expected dtype in {sorted(_WIRE_DTYPES)}, got {descriptor['dtype']!r}")
    # Bounded sides: with a zero side, huge others would pass the byte limits (0 bytes) and fail in reshape.
    shape = tuple(check_int(name, side, 0, MAX_DIM) for side in check_sequence(name, descriptor["shape"], 4))
    return name, dtype, shape
