"""The official Cosmos Policy ALOHA `/act` format: the request its client sends, the reply its server answers.

Sources: `experiments/robot/aloha/deploy.py` (`get_server_action`) and `run_aloha_eval.py` (`get_action_from_server`).
The client POSTs a JSON object whose arrays are json_numpy-encoded: `primary_image`, `left_wrist_image`,
`right_wrist_image` (uint8 H×W×3, resized by the client), `proprio` (the qpos; float64 from the robot, cast to float32
by the server), `task_description`, optional `return_all_query_results`. No seed: the server's applies. Other keys are
ignored, as the official server ignores them (its client sends `proprio_history` and `images_history` when it keeps
an observation history; other clients send their own). A client without
json_numpy may wrap the json_numpy text in `{"encoded": "<text>"}`; that request is answered with the reply's
json_numpy text as a JSON string rather than an object.

The reply holds `actions` (a list of chunk_size float32 rows), `future_image_predictions` (the official keys, each a
black uint8 224×224×3 frame: no future image is decoded, and the official client run with `--future_img True`, as
every documented command runs it, saves a video of them, which a null would crash) and `value_prediction`. The
official client reads `value_predictions` instead, a key the official server never sends, so the reply carries both.
With
`return_all_query_results`, the `all_*` keys list every query's results: every candidate of a planning mode (each its
first-level chunk; a candidate not scored before the planning deadline has a null value), or the one query of the
reactive mode, with future-image entries laid out as the official lists lay them for the mode's configuration
(`CandidateImageLists`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cosmos_edge.robot_bridge.act_messages import sampled_chunks
from cosmos_edge.robot_bridge.json_arrays import COMPACT, SPACED, encode_array, parse_json, to_array
from cosmos_edge.robot_bridge.protocol import ActReply, check_instruction
from cosmos_edge.robot_bridge.wire import ErrorCode, MessageError, invalid, wire_proprio
from cosmos_edge.runtime.checks import describe
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.platforms import IMAGE_SIZE

# Official key → camera of the ALOHA platform (`runtime/platforms.py`), as the official code feeds its slots.
CAMERAS: Mapping[str, str] = {
    "primary_image": "cam_high",
    "left_wrist_image": "cam_left_wrist",
    "right_wrist_image": "cam_right_wrist",
}


def check_official_cameras(platform: str, cameras: Sequence[str]) -> None:
    """The official format carries ALOHA's three cameras; a platform with others cannot be served through it."""
    if set(cameras) != set(CAMERAS.values()):
        raise ConfigError(
            f"http: the official /act format carries ALOHA's cameras {sorted(CAMERAS.values())}; platform "
            f"{platform!r} has {list(cameras)}"
        )


# The official ALOHA server's future image keys (`cosmos_utils.get_future_images_from_generated_samples`: two wrist
# cameras, one third-person camera).
FUTURE_IMAGE_KEYS = ("future_wrist_image", "future_wrist_image2", "future_image")
# As the official server's future images; encoded once (json_numpy's base64), not in every reply.
_BLACK_FRAME = encode_array(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))

# Sent by the official client when it keeps an observation history; its server ignores them, as every other key.
_HISTORY_KEYS = frozenset({"proprio_history", "images_history"})
_REQUIRED = frozenset({*CAMERAS, "proprio", "task_description"})
_KEYS = _REQUIRED | {"return_all_query_results"}
_SHOWN_IGNORED = 8  # ignored keys named in the log line of a request


@dataclass(frozen=True)
class OfficialQuery:
    """A checked `/act` request: `images` by camera name of the platform, `proprio` float32."""

    images: Mapping[str, np.ndarray]
    proprio: np.ndarray
    task_description: str
    return_all_query_results: bool
    double_encoded: bool
    ignored_keys: tuple[str, ...] = ()  # keys the request held that are not read (the first few, sorted)


def parse_query(body: bytes, image_size: tuple[int, int], proprio_dim: int) -> OfficialQuery:
    """Reads an `/act` body; raises `MessageError` naming the key at fault."""
    payload = _json_object(body, "body")
    double_encoded = "encoded" in payload
    if double_encoded:
        if set(payload) != {"encoded"}:
            raise invalid("encoded", f"expected the only key, holding json_numpy text; got keys {sorted(payload)}")
        if not isinstance(payload["encoded"], str):
            got = describe(payload["encoded"])
            raise invalid("encoded", f"expected json_numpy text (a JSON string holding the request), got {got}")
        # "surrogatepass": a lone surrogate escape ("\ud800") is valid JSON; its text then fails to parse, as bad text.
        payload = _json_object(payload["encoded"].encode("utf-8", "surrogatepass"), "encoded")
    ignored = tuple(sorted(set(payload) - _KEYS - _HISTORY_KEYS)[:_SHOWN_IGNORED])
    missing = sorted(key for key in _REQUIRED if key not in payload)
    if missing:
        unread = f"; it holds keys this server does not read: {list(ignored)}" if ignored else ""
        raise invalid(missing[0], f"missing; the request needs {sorted(_REQUIRED)}{unread}")
    task = check_instruction(payload["task_description"], "task_description")
    return_all = payload.get("return_all_query_results")
    if return_all is None:  # absent, or null, which the official server's `if return_all_query_results:` takes as false
        return_all = False
    if not isinstance(return_all, bool):
        raise invalid("return_all_query_results", f"expected true or false, got {describe(return_all)}")
    return OfficialQuery(
        images={camera: _image(payload[key], key, image_size) for key, camera in CAMERAS.items()},
        proprio=_proprio(payload["proprio"], proprio_dim),
        task_description=task,
        return_all_query_results=return_all,
        double_encoded=double_encoded,
        ignored_keys=ignored,
    )


@dataclass(frozen=True)
class CandidateImageLists:
    """Which future-image entries the official `all_future_image_predictions_by_depth` lists hold for each candidate
    of a mode (deploy.py 418-424, 574-576, 667-674). The default is the reactive mode's (the official base config).

    `per_depth`: one image set (null here: none are decoded) per per-depth value when a world model predicted each
    valued state (`ar_future_prediction`); otherwise the candidate's list is empty. `all_future_image_predictions`
    holds a null image set per candidate whatever the mode: the official server's None for candidates ranked by
    Q(s, a) without a world model (deploy.py 671) crashes its own client as it saves the episode
    (`run_aloha_eval.py` 949-950 tests a key of each entry)."""

    per_depth: bool = False


def reply_body(reply: ActReply, query: OfficialQuery, image_lists: CandidateImageLists | None = None) -> bytes:
    """The official server's reply to `query`; with `return_all_query_results`, `reply` must carry its candidates
    (a planning mode) or stands for the one query (the reactive mode), and `image_lists` says how the mode's
    candidates pair with future images (default: as the reactive mode's)."""
    lists = image_lists or CandidateImageLists()
    actions = list(reply.actions)  # one array per step, as the official server sends them
    response: dict[str, object] = {
        "actions": actions,
        "future_image_predictions": _black_future_images(),
        "value_prediction": reply.value,
        "value_predictions": reply.value,
    }
    if query.return_all_query_results:
        every_actions: list[list[np.ndarray] | None] = [actions]
        every_value: list[float | None] = [reply.value]
        by_depth: list[list[float | None]] = [[reply.value]]
        actions_by_depth: list[list[list[np.ndarray] | None]] = [[actions]]
        candidate_actions, chunks = sampled_chunks(reply)
        values_by_depth = reply.candidate_values_by_depth
        if candidate_actions is not None and chunks is not None and values_by_depth is not None:
            every_actions = [_rows(chunk) for chunk in candidate_actions]
            every_value, by_depth = list(reply.candidate_values or ()), [list(row) for row in values_by_depth]
            actions_by_depth = [[_rows(chunk) for chunk in row] for row in chunks]
        response |= {
            "all_actions": every_actions,
            "all_future_image_predictions": [_no_future_images() for _ in every_actions],
            "all_value_predictions": every_value,
            "all_actions_by_depth": actions_by_depth,
            "all_future_image_predictions_by_depth": [
                [_no_future_images() for _ in row] if lists.per_depth else [] for row in by_depth
            ],
            "all_value_predictions_by_depth": by_depth,
        }
    if query.double_encoded:  # `JSONResponse(json_numpy.dumps(response))`: a JSON string holding json_numpy text
        return COMPACT.encode(SPACED.encode(response)).encode("ascii")
    return COMPACT.encode(response).encode("ascii")


def _rows(chunk: np.ndarray) -> list[np.ndarray] | None:
    """A chunk as the official server lists one (an array per step), or None where none was sampled."""
    return None if np.isnan(chunk).any() else list(chunk)


def _no_future_images() -> dict[str, None]:
    return dict.fromkeys(FUTURE_IMAGE_KEYS)


def _black_future_images() -> dict[str, dict[str, object]]:
    """What the chosen query's `future_image_predictions` hold: frames the official client can save (`--future_img`
    takes `future_image`'s shape), black, since none is decoded."""
    return {key: _BLACK_FRAME for key in FUTURE_IMAGE_KEYS}


def _json_object(text: bytes, field: str) -> dict[str, object]:
    try:
        value = parse_json(text.decode("utf-8"))
    except ValueError as error:  # UnicodeDecodeError and JSONDecodeError are both ValueErrors
        raise MessageError(ErrorCode.MALFORMED, field, f"expected a JSON object, got bad text: {error}") from None
    if not isinstance(value, dict):
        raise MessageError(ErrorCode.MALFORMED, field, f"expected a JSON object, got {describe(value)}")
    return value


def _image(value: object, key: str, image_size: tuple[int, int]) -> np.ndarray:
    image = to_array(value, key, ("|u1",))
    expected = (*image_size, 3)
    if image.shape != expected:
        raise invalid(key, f"expected shape {expected} (the client resizes), got {image.shape}")
    if image.dtype == np.uint8:
        return image
    # A nested list: integers that fit uint8 (the official server's `np.array(..., dtype=np.uint8)` would wrap them).
    if image.dtype.kind not in "iu":
        raise invalid(key, f"expected integers in 0..255, got {image.dtype} values")
    if image.min() < 0 or image.max() > 255:
        raise invalid(key, f"expected integers in 0..255, got values in {image.min()}..{image.max()}")
    return image.astype(np.uint8)


def _proprio(value: object, proprio_dim: int) -> np.ndarray:
    proprio = to_array(value, "proprio", ("<f8", "<f4"))
    if proprio.shape != (proprio_dim,):
        raise invalid("proprio", f"expected shape ({proprio_dim},), got {proprio.shape}")
    return wire_proprio(proprio)
