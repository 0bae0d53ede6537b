"""Messages of the bridge protocol, version 1 (described in docs/protocol.md), and their decoders.

Requests: `act`, `metadata`, `ping`, `set_mode`. Replies: `act_result`, `metadata_result`, `pong`, `mode_set`,
`error`. Every message is a frozen dataclass whose `__post_init__` validates it; decoding builds the same dataclass,
so a message built locally and one received from the network pass the same checks. A failed check raises
`MessageError` (a `ProtocolError`) with an `ErrorCode` and the field at fault, which the server returns as an `error`
reply. The framing itself (header, array frames, limits) is in `wire`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar, TypeVar

import numpy as np

from cosmos_edge.robot_bridge.wire import (
    INT64_MAX,
    MAX_DIM,
    MAX_LIST,
    MAX_NAME,
    PROTOCOL_VERSION,
    UINT64_MAX,
    Envelope,
    ErrorCode,
    FieldTaker,
    FrameLike,
    MessageError,
    MessageKind,
    OutFrame,
    WireLimits,
    check_array,
    check_float,
    check_int,
    check_optional_int,
    check_sequence,
    check_text,
    check_texts,
    encode,
    invalid,
    parse,
    set_field,
)
from cosmos_edge.runtime.policy.api import MAX_DENOISING_STEPS, MAX_SEED, PlanningOutcome

# The protocol's public names, including those defined in `wire`, so that users need one import.
__all__ = [
    "MAX_TIMEOUT_MS",
    "PROTOCOL_VERSION",
    "ActReply",
    "ActRequest",
    "ErrorCode",
    "ErrorReply",
    "FrameLike",
    "MessageError",
    "MessageKind",
    "MetadataRequest",
    "ModeSet",
    "OutFrame",
    "PingRequest",
    "Pong",
    "Reply",
    "Request",
    "ServerMetadata",
    "SetModeRequest",
    "WireLimits",
    "decode_reply",
    "decode_request",
]

MAX_TIMEOUT_MS = 2**32 - 1  # about 50 days; a longer deadline is sent as this one
_MAX_TEXT = 1024


def check_instruction(instruction: object, field: str = "instruction") -> str:
    """An `act`'s instruction as the protocol takes it (text of 1..1024 characters); `MessageError` naming `field`
    (the key that carried it) otherwise."""
    return check_text(field, instruction, _MAX_TEXT)


_MAX_ERROR_TEXT = 2048
_MAX_CAMERAS = 8
_OUTCOMES = frozenset(outcome.value for outcome in PlanningOutcome)
_IMAGE_PREFIX = "image/"
_DEFAULT_LIMITS = WireLimits()


M = TypeVar("M", bound="_Message")


def _to_wire(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return [_to_wire(item) for item in value]
    return value


@dataclass(frozen=True, eq=False)
class _Message:
    """Base of every message. By default every other field is a header field, sent unless it is None; fields named
    in `_array_fields` travel as array frames, and those in `_array_maps` (name -> prefix) as one array frame per
    entry, named with the prefix."""

    kind: ClassVar[MessageKind]
    _array_fields: ClassVar[tuple[str, ...]] = ()
    _array_maps: ClassVar[Mapping[str, str]] = {}
    request_id: int

    def __post_init__(self) -> None:
        set_field(self, "request_id", check_int("request_id", self.request_id, 0, UINT64_MAX))

    def to_frames(self) -> list[OutFrame]:
        """Frames to send. Array frames are views of this message's arrays: do not modify them until sent."""
        fields, arrays = self._payload()
        return encode(self.kind, self.request_id, fields, arrays)

    def _payload(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        fields: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name in self._array_maps:
                arrays.update({self._array_maps[item.name] + key: array for key, array in value.items()})
            elif item.name in self._array_fields:
                if value is not None:
                    arrays[item.name] = value
            elif item.name != "request_id" and value is not None:
                fields[item.name] = _to_wire(value)
        return fields, arrays

    @classmethod
    def _from_envelope(cls: type[M], envelope: Envelope) -> M:
        fields = FieldTaker(envelope.fields, "field")
        arrays = FieldTaker(envelope.arrays, "array")
        values = {}
        for item in dataclasses.fields(cls):
            if item.name in cls._array_maps:
                values[item.name] = arrays.take_prefixed(cls._array_maps[item.name])
            elif item.name != "request_id":
                source = arrays if item.name in cls._array_fields else fields
                values[item.name] = source.take(item.name, required=item.default is dataclasses.MISSING)
        fields.finish()
        arrays.finish()
        return cls(request_id=envelope.request_id, **values)


def _build(cls: type[M], envelope: Envelope) -> M:
    try:
        return cls._from_envelope(envelope)
    except MessageError as error:
        error.request_id = envelope.request_id
        raise


@dataclass(frozen=True, eq=False)
class ActRequest(_Message):
    """One observation to act on. `images` maps camera name to uint8 (H, W, 3); `proprio` is float32 (proprio_dim,).

    `obs_id` is the controller's increasing observation counter; the reply echoes it so that the controller can drop
    stale chunks. `capture_time_ns` is the controller's capture timestamp on its own clock, carried for its records;
    the server does not interpret it. `mode`, `seed`, `steps` override the server's defaults when given.
    `timeout_ms` is the sender's deadline, counted from when the server receives the request: a request still waiting
    then is answered `expired` without being computed. None: no deadline. `planning_summary` asks a planning mode's
    reply to say how the query ended and what each candidate scored; `return_all_query_results` also asks for every
    candidate's actions and per-depth values, and `return_actions_by_depth` with it for each candidate's chunk at every
    depth (see `ActReply`).
    """

    kind: ClassVar[MessageKind] = MessageKind.ACT
    _array_fields: ClassVar[tuple[str, ...]] = ("proprio",)
    _array_maps: ClassVar[Mapping[str, str]] = {"images": _IMAGE_PREFIX}
    obs_id: int
    capture_time_ns: int
    instruction: str
    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    mode: str | None = None
    seed: int | None = None
    steps: int | None = None
    timeout_ms: int | None = None
    planning_summary: bool | None = None
    return_all_query_results: bool | None = None
    return_actions_by_depth: bool | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "obs_id", check_int("obs_id", self.obs_id, 0, INT64_MAX))
        set_field(self, "capture_time_ns", check_int("capture_time_ns", self.capture_time_ns, 0, INT64_MAX))
        set_field(self, "instruction", check_instruction(self.instruction))
        if not isinstance(self.images, Mapping) or not 1 <= len(self.images) <= _MAX_CAMERAS:
            raise invalid("images", f"expected a mapping of 1..{_MAX_CAMERAS} cameras to images")
        images = {}
        for camera, image in self.images.items():
            name = _IMAGE_PREFIX + check_text("images", camera, MAX_NAME)
            images[camera] = check_array(name, image, "uint8", 3)
            if image.shape[2] != 3:
                raise invalid(name, f"expected 3 channels (H, W, 3), got shape {image.shape}")
        set_field(self, "images", images)
        set_field(self, "proprio", check_array("proprio", self.proprio, "float32", 1))
        set_field(self, "mode", None if self.mode is None else check_text("mode", self.mode, MAX_NAME))
        set_field(self, "seed", check_optional_int("seed", self.seed, 0, MAX_SEED))
        set_field(self, "steps", check_optional_int("steps", self.steps, 1, MAX_DENOISING_STEPS))
        set_field(self, "timeout_ms", check_optional_int("timeout_ms", self.timeout_ms, 1, MAX_TIMEOUT_MS))
        for name in ("planning_summary", "return_all_query_results", "return_actions_by_depth"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise invalid(name, f"expected true or false, got {value!r}")
        if self.return_actions_by_depth and not self.return_all_query_results:  # what it adds to: not ignored
            raise invalid(
                "return_actions_by_depth", "expected only with return_all_query_results, whose lists it adds to"
            )


@dataclass(frozen=True, eq=False)
class MetadataRequest(_Message):
    kind: ClassVar[MessageKind] = MessageKind.METADATA


@dataclass(frozen=True, eq=False)
class PingRequest(_Message):
    kind: ClassVar[MessageKind] = MessageKind.PING


@dataclass(frozen=True, eq=False)
class SetModeRequest(_Message):
    kind: ClassVar[MessageKind] = MessageKind.SET_MODE
    mode: str

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "mode", check_text("mode", self.mode, MAX_NAME))


@dataclass(frozen=True, eq=False)
class ActReply(_Message):
    """The chunk for observation `obs_id`: `actions` float32 (chunk, action_dim), un-normalised absolute targets.
    Decoded arrays (here and in `ActRequest`) are read-only views of the received frames; copy them to modify.

    `timings_ms` holds the server's stages in the order they ran. `server_receive_ns`/`server_send_ns` are the
    server's wall clock when the request arrived and when this reply was encoded.

    A planning mode adds, when the request asked (`planning_summary` or `return_all_query_results`: a client that
    predates these fields asks neither, and gets replies it can decode), `planning` (how the query ended: complete,
    best_so_far or reactive, see `PlanningOutcome`), `chosen_index` and `candidate_values` (None for a candidate not
    scored before the deadline); with `return_all_query_results`, also `candidate_values_by_depth` and
    `candidate_actions` (zeros for a candidate whose action pass did not finish before the deadline), and with
    `return_actions_by_depth` too, `candidate_actions_by_depth` (candidates, entries, chunk, action_dim): the chunk of
    the action pass behind each per-depth value, the first level's first (zeros where not computed in time).
    """

    kind: ClassVar[MessageKind] = MessageKind.ACT_RESULT
    _array_fields: ClassVar[tuple[str, ...]] = ("actions", "candidate_actions", "candidate_actions_by_depth")
    obs_id: int
    actions: np.ndarray
    value: float
    mode: str
    timings_ms: Mapping[str, float]
    server_version: str
    server_receive_ns: int
    server_send_ns: int
    planning: str | None = None
    chosen_index: int | None = None
    candidate_values: tuple[float | None, ...] | None = None
    candidate_values_by_depth: tuple[tuple[float | None, ...], ...] | None = None
    candidate_actions: np.ndarray | None = None
    candidate_actions_by_depth: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "obs_id", check_int("obs_id", self.obs_id, 0, INT64_MAX))
        set_field(self, "actions", check_array("actions", self.actions, "float32", 2))
        set_field(self, "value", check_float("value", self.value))
        set_field(self, "mode", check_text("mode", self.mode, MAX_NAME))
        if not isinstance(self.timings_ms, Mapping) or len(self.timings_ms) > MAX_NAME:
            raise invalid("timings_ms", f"expected a map of at most {MAX_NAME} stages")
        timings = {
            check_text("timings_ms", k, MAX_NAME): check_float(f"timings_ms.{k}", v) for k, v in self.timings_ms.items()
        }
        set_field(self, "timings_ms", timings)
        set_field(self, "server_version", check_text("server_version", self.server_version, MAX_NAME))
        set_field(self, "server_receive_ns", check_int("server_receive_ns", self.server_receive_ns, 0, INT64_MAX))
        set_field(self, "server_send_ns", check_int("server_send_ns", self.server_send_ns, 0, INT64_MAX))
        self._check_candidates()

    def _check_candidates(self) -> None:
        if self.planning is not None and check_text("planning", self.planning, MAX_NAME) not in _OUTCOMES:
            raise invalid("planning", f"expected one of {sorted(_OUTCOMES)}, got {self.planning!r}")
        set_field(self, "chosen_index", check_optional_int("chosen_index", self.chosen_index, 0, INT64_MAX))
        if (self.planning is not None or self.chosen_index is not None) and self.candidate_values is None:
            raise invalid("candidate_values", "expected with planning and chosen_index")
        count = None
        if self.candidate_values is not None:
            set_field(self, "candidate_values", _optional_values("candidate_values", self.candidate_values))
            count = len(self.candidate_values)
            if self.chosen_index is not None and self.chosen_index >= count:
                raise invalid("chosen_index", f"expected an index below {count} candidates, got {self.chosen_index}")
        if self.candidate_values_by_depth is not None:
            rows = check_sequence("candidate_values_by_depth", self.candidate_values_by_depth, MAX_LIST)
            by_depth = tuple(_optional_values(f"candidate_values_by_depth[{i}]", row) for i, row in enumerate(rows))
            if len({len(row) for row in by_depth}) > 1:
                raise invalid("candidate_values_by_depth", "expected rows of one width (entries per candidate)")
            set_field(self, "candidate_values_by_depth", by_depth)
            _check_count("candidate_values_by_depth", len(by_depth), count)
        if self.candidate_actions is not None:
            set_field(self, "candidate_actions", check_array("candidate_actions", self.candidate_actions, "float32", 3))
            _check_count("candidate_actions", self.candidate_actions.shape[0], count)
        if self.candidate_actions_by_depth is not None:
            by_depth_actions = check_array("candidate_actions_by_depth", self.candidate_actions_by_depth, "float32", 4)
            set_field(self, "candidate_actions_by_depth", by_depth_actions)
            _check_count("candidate_actions_by_depth", by_depth_actions.shape[0], count)
            widths = {len(row) for row in self.candidate_values_by_depth or ()}
            if widths and widths != {by_depth_actions.shape[1]}:
                raise invalid(
                    "candidate_actions_by_depth",
                    f"expected {widths.pop()} entries per candidate (as candidate_values_by_depth), got "
                    f"{by_depth_actions.shape[1]}",
                )


def _check_count(field: str, got: int, count: int | None) -> None:
    if count is None:
        raise invalid(field, "expected candidate_values with it")
    if got != count:
        raise invalid(field, f"expected one entry per candidate ({count}), got {got}")


def _optional_values(field: str, value: object) -> tuple[float | None, ...]:
    """Values in [0, 1], or None where one was not computed."""
    items = check_sequence(field, value, MAX_LIST)
    return tuple(None if item is None else check_float(field, item, 0.0, 1.0) for item in items)


@dataclass(frozen=True, eq=False)
class ServerMetadata(_Message):
    """What a controller needs before its first `act`. Every header carries the protocol version, so it is not
    repeated here. `joint_limits` is one (lower, upper) pair per action dim, when the server was given limits.
    `instructions` are those every mode accepts; `mode` is the mode in force."""

    kind: ClassVar[MessageKind] = MessageKind.METADATA_RESULT
    platform: str
    cameras: tuple[str, ...]
    image_size: tuple[int, int]
    chunk_size: int
    control_rate_hz: float
    action_dim: int
    proprio_dim: int
    modes: tuple[str, ...]
    mode: str
    instructions: tuple[str, ...]
    server_version: str
    joint_limits: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "platform", check_text("platform", self.platform, MAX_NAME))
        set_field(self, "cameras", check_texts("cameras", self.cameras))
        size = check_sequence("image_size", self.image_size, 2)
        set_field(self, "image_size", tuple(check_int("image_size", side, 1, MAX_DIM) for side in size))
        if len(self.image_size) != 2:
            raise invalid("image_size", f"expected (height, width), got {self.image_size}")
        set_field(self, "chunk_size", check_int("chunk_size", self.chunk_size, 1, MAX_DIM))
        set_field(self, "control_rate_hz", check_float("control_rate_hz", self.control_rate_hz, 1e-3, 1e4))
        set_field(self, "action_dim", check_int("action_dim", self.action_dim, 1, MAX_DIM))
        set_field(self, "proprio_dim", check_int("proprio_dim", self.proprio_dim, 1, MAX_DIM))
        set_field(self, "modes", check_texts("modes", self.modes))
        set_field(self, "mode", check_text("mode", self.mode, MAX_NAME))
        if not self.modes or self.mode not in self.modes:
            raise invalid("mode", f"expected one of {list(self.modes)}, got {self.mode!r}")
        set_field(self, "instructions", check_texts("instructions", self.instructions, _MAX_TEXT))
        set_field(self, "server_version", check_text("server_version", self.server_version, MAX_NAME))
        if self.joint_limits is not None:
            set_field(self, "joint_limits", _joint_limits(self.joint_limits, self.action_dim))

    def as_dict(self) -> dict[str, Any]:
        """The fields a user reads (`client metadata`, HTTP `GET /metadata`): all but the request id."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if item.name != "request_id"}


def _joint_limits(value: object, action_dim: int) -> tuple[tuple[float, float], ...]:
    pairs = check_sequence("joint_limits", value, MAX_DIM)
    if len(pairs) != action_dim:
        raise invalid("joint_limits", f"expected {action_dim} (lower, upper) pairs, got {len(pairs)}")
    limits = []
    for index, pair in enumerate(pairs):
        field = f"joint_limits[{index}]"
        bounds = check_sequence(field, pair, 2)
        if len(bounds) != 2:
            raise invalid(field, f"expected a (lower, upper) pair, got {len(bounds)} values")
        lower, upper = (check_float(field, bound) for bound in bounds)
        if not lower < upper:
            raise invalid(field, f"expected lower < upper, got ({lower}, {upper})")
        limits.append((lower, upper))
    return tuple(limits)


@dataclass(frozen=True, eq=False)
class Pong(_Message):
    """`server_time_ns` is the server's wall clock, for estimating the clock offset between the machines."""

    kind: ClassVar[MessageKind] = MessageKind.PONG
    server_time_ns: int
    server_version: str

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "server_time_ns", check_int("server_time_ns", self.server_time_ns, 0, INT64_MAX))
        set_field(self, "server_version", check_text("server_version", self.server_version, MAX_NAME))


@dataclass(frozen=True, eq=False)
class ModeSet(_Message):
    kind: ClassVar[MessageKind] = MessageKind.MODE_SET
    mode: str
    previous_mode: str

    def __post_init__(self) -> None:
        super().__post_init__()
        set_field(self, "mode", check_text("mode", self.mode, MAX_NAME))
        set_field(self, "previous_mode", check_text("previous_mode", self.previous_mode, MAX_NAME))


@dataclass(frozen=True, eq=False)
class ErrorReply(_Message):
    """`field` names what was at fault; it is empty when the policy rejected the request as a whole (its message
    then names the field). Request id 0 answers a message whose header could not be read."""

    kind: ClassVar[MessageKind] = MessageKind.ERROR
    code: ErrorCode
    field: str
    message: str

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            set_field(self, "code", ErrorCode(self.code))
        except ValueError:
            raise invalid("code", f"expected one of {[c.value for c in ErrorCode]}, got {self.code!r}") from None
        set_field(self, "field", check_text("field", self.field, 2 * MAX_NAME, allow_empty=True))
        set_field(self, "message", check_text("message", self.message, _MAX_ERROR_TEXT))

    @classmethod
    def from_error(cls, error: MessageError) -> ErrorReply:
        """The reply of `error`, whatever it holds (a policy's error may carry no message, or a field of no text): an
        error reply must always encode, or its request would go unanswered."""
        field = error.field if isinstance(error.field, str) else ""
        message = str(error)[:_MAX_ERROR_TEXT] or f"{error.code.value} (no detail given)"
        return cls(error.request_id or 0, error.code, field[: 2 * MAX_NAME], message)


Request = ActRequest | MetadataRequest | PingRequest | SetModeRequest
Reply = ActReply | ServerMetadata | Pong | ModeSet | ErrorReply

_REQUEST_TYPES: dict[MessageKind, type[Request]] = {
    cls.kind: cls for cls in (ActRequest, MetadataRequest, PingRequest, SetModeRequest)
}
_REPLY_TYPES: dict[MessageKind, type[Reply]] = {
    cls.kind: cls for cls in (ActReply, ServerMetadata, Pong, ModeSet, ErrorReply)
}


def _decode(frames: Sequence[FrameLike], limits: WireLimits | None, types: Mapping[MessageKind, type[M]]) -> M:
    envelope = parse(frames, limits or _DEFAULT_LIMITS, types.keys())
    return _build(types[envelope.kind], envelope)


def decode_request(frames: Sequence[FrameLike], limits: WireLimits | None = None) -> Request:
    """Decodes what a controller sent; raises `MessageError` for anything malformed, never another exception."""
    return _decode(frames, limits, _REQUEST_TYPES)


def decode_reply(frames: Sequence[FrameLike], limits: WireLimits | None = None) -> Reply:
    """Decodes what the server sent; raises `MessageError` for anything malformed, never another exception."""
    return _decode(frames, limits, _REPLY_TYPES)
