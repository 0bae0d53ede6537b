"""What an `act` request is refused for on the server's I/O thread, before it waits for the worker: a mode the server
did not load, cameras or array shapes other than the served platform's, an instruction its mode has no embedding for.
Each refusal names the request's field, as the reply carries it."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from cosmos_edge.robot_bridge.protocol import ActRequest, ErrorCode, MessageError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.api import Policy

_SUGGESTIONS = 3  # known instructions named when one is unknown


@dataclass(frozen=True)
class ActAdmission:
    """`instructions`: the known instructions of each mode, read once from its policy."""

    platform: PlatformSpec
    image_size: tuple[int, int]
    instructions: Mapping[str, frozenset[str]]

    @classmethod
    def of(cls, policies: Mapping[str, Policy], platform: PlatformSpec, image_size: tuple[int, int]) -> ActAdmission:
        known = {mode: frozenset(policy.instructions) for mode, policy in policies.items()}
        return cls(platform, image_size, known)

    def check(self, request: ActRequest, mode: str) -> None:
        """Raises the `MessageError` the request is answered with, if any, for `mode` (the one that would answer)."""
        self.check_mode(mode, request.request_id)
        self._check_arrays(request)
        self._check_instruction(request, mode)

    def check_mode(self, mode: str, request_id: int) -> None:
        """A mode this server loaded (an `act`'s, or a `set_mode`'s)."""
        if mode not in self.instructions:
            loaded = list(self.instructions)
            detail = f"expected one of {loaded}, the modes this server loaded (its log says why no other), got {mode!r}"
            raise MessageError(ErrorCode.UNKNOWN_MODE, "mode", detail, request_id)

    def _check_arrays(self, request: ActRequest) -> None:
        cameras = self.platform.cameras
        if set(request.images) != set(cameras):
            detail = f"expected cameras {list(cameras)}, got {list(request.images)}"
            raise MessageError(ErrorCode.INVALID_FIELD, "images", detail, request.request_id)
        expected = (*self.image_size, 3)
        for camera, image in request.images.items():
            if image.shape != expected:
                resizes = "the client resizes" if self.platform.name == "aloha" else "the server's --image-size"
                detail = f"expected shape {expected} ({resizes}), got {image.shape}"
                raise MessageError(ErrorCode.INVALID_FIELD, f"image/{camera}", detail, request.request_id)
        if request.proprio.shape != (self.platform.proprio_dim,):
            detail = f"expected shape ({self.platform.proprio_dim},), got {request.proprio.shape}"
            raise MessageError(ErrorCode.INVALID_FIELD, "proprio", detail, request.request_id)

    def _check_instruction(self, request: ActRequest, mode: str) -> None:
        known = self.instructions[mode]
        if request.instruction in known:
            return
        closest = difflib.get_close_matches(request.instruction, known, n=_SUGGESTIONS, cutoff=0.0)
        detail = f"no text embedding for {request.instruction!r} in mode {mode!r}; closest known: {closest}"
        raise MessageError(ErrorCode.INVALID_INPUT, "instruction", detail, request.request_id)
