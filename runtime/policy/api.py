"""The policy interface and its messages, and what a policy needs from its networks. Read this first.

Every policy (reactive, planning; on torch, ONNX Runtime or TensorRT networks) meets `Policy`; the robot bridge
serves anything that does, and wrapping (timing, safety) happens outside. Network arrays are float32 in the layouts
of the official model, numpy arrays or, for a network that keeps them on its device, that device's tensors (its
`arrays`): video "b 3 f h w" in [-1, 1], latents "b 16 t h/8 w/8" (normalised with the Wan2.1 mean/std).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.arrays import ArrayOps

FloatArray = npt.NDArray[np.float32]

NetworkFn = Callable[[FloatArray, FloatArray, FloatArray], FloatArray]
"""`net(x_in "b c t h w", timesteps "b t", condition_mask "b 1 t h w") -> F "b c t h w"`, all float32.

F is the rectified-flow velocity (noise − x0). The text embedding is bound inside the callable by the caller.
x_in and the mask are arrays of the network's place (`ArrayOps`); the timesteps are always a host (numpy) array, so a
network may key a cache on their values without waiting for its device.
The official model casts x_in and the timesteps to bf16 at this boundary; the timesteps arrive here already
bf16-rounded, x_in does not (a bf16 engine rounds it on input, a float32 reference network must round it itself
to match the official numbers).
"""


@dataclass(frozen=True)
class Observation:
    """One uint8 H×W×3 image per camera of the platform, and the raw (un-normalised) proprio vector. Images are the
    camera's frames as rendered: for LIBERO and RoboCasa upside down, flipped by the preprocessing (as the official
    evaluation scripts flip them)."""

    images: Mapping[str, np.ndarray]
    proprio: np.ndarray


def check_camera_frame(camera: str, frame: object) -> np.ndarray:
    """`frame` if it is a uint8 H×W×3 array with H, W > 0 (what `Observation.images` holds); else InputError naming
    the camera."""
    field = f"images[{camera!r}]"
    if not isinstance(frame, np.ndarray):
        raise InputError(f"{field}: expected a numpy uint8 array [H, W, 3], got {type(frame).__name__}", "images")
    if frame.dtype != np.uint8:
        raise InputError(f"{field}: expected dtype uint8, got {frame.dtype}", "images")
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"{field}: expected shape [H, W, 3] with H, W > 0, got {list(frame.shape)}", "images")
    return frame


# The most denoising steps of one pass that a query, a planning option or a request may ask for: the official
# configurations use 1 to 10, and every step is a whole DiT call.
MAX_DENOISING_STEPS = 100

# Seeds are 32-bit: the official sampler seeds numpy's legacy RandomState with them.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ActionQuery:
    observation: Observation
    instruction: str
    seed: int = 195
    steps: int | None = None  # None: the platform's default action steps
    return_future_images: bool = False


class PlanningOutcome(str, Enum):
    """How a planning query ended."""

    COMPLETE = "complete"
    """Every candidate was scored."""
    BEST_SO_FAR = "best_so_far"
    """The deadline passed: the best of the candidates scored in time."""
    REACTIVE = "reactive"
    """The deadline passed before any candidate was scored: the base candidate's action pass, unranked."""


@dataclass(frozen=True)
class CandidateResults:
    """Every candidate of a planning query, in candidate order (candidate i used seed s + i).

    `actions` "n chunk action_dim" (un-normalised, each candidate's first-level chunk), `values` "n" float64 (what
    ranked them), `values_by_depth` "n entries" (the official `value_predictions_by_depth`: 1 + (depth - 1)·K entries),
    `actions_by_depth` "n entries chunk action_dim" (the official `actions_by_depth`: the chunk of the action pass
    behind each entry, the first level's first), and the index of the `chosen` one. A candidate not scored before the
    deadline has NaN values and NaN actions (a worker keeps none of a candidate until it is scored), except the base
    candidate 0, whose action pass always runs; a candidate ranked out (a non-finite value, chunk or future proprio)
    has NaN values and the actions it sampled.
    """

    chosen: int
    actions: np.ndarray
    values: np.ndarray
    values_by_depth: np.ndarray
    actions_by_depth: np.ndarray
    outcome: PlanningOutcome = PlanningOutcome.COMPLETE


@dataclass(frozen=True)
class ChunkResult:
    """`actions` is (chunk, action_dim) float32, un-normalised; `value` is in [0, 1].

    `timings_ms` maps stage name to milliseconds, in the order the stages ran. `candidates`: every candidate of a
    planning query (None in the reactive mode).
    """

    actions: np.ndarray
    value: float
    future_proprio: np.ndarray
    future_images: Mapping[str, np.ndarray] | None = None
    timings_ms: Mapping[str, float] = field(default_factory=dict)
    candidates: CandidateResults | None = None


@runtime_checkable
class Policy(Protocol):
    @property
    def platform(self) -> PlatformSpec: ...

    @property
    def instructions(self) -> tuple[str, ...]:
        """Instructions this policy has text embeddings for."""
        ...

    def infer(self, query: ActionQuery) -> ChunkResult: ...

    def reset(self) -> None: ...


class VideoAutoencoder(Protocol):
    def encode(self, video: np.ndarray) -> np.ndarray:
        """ "b 3 (1+4k) h w" → normalised latent "b 16 (1+k) h/8 w/8"."""
        ...

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """Normalised latent "b 16 (1+k) h w" → video "b 3 (1+4k) 8h 8w" in [-1, 1]."""
        ...


class ConditioningEncoder(Protocol):
    def encode_conditioning(self, images: Mapping[str, np.ndarray], timer: StageTimer) -> np.ndarray:
        """Raw uint8 "h w 3" frames, one per camera → the normalised latents of the conditioning prefix "1 16 k h w"
        (blank, proprio and camera slots: the official image transforms, pixel video and VAE encode)."""
        ...


class DenoisingNetwork(Protocol):
    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        """The network with its text conditioning fixed to "1 l d" (a backend may compute what depends on it alone
        once here: the torch DiT its cross-attention K/V)."""
        ...


@runtime_checkable
class DeviceNetwork(DenoisingNetwork, Protocol):
    """A `DenoisingNetwork` whose bound callable takes and returns the arrays of `arrays` (device tensors), so a
    sampling pass stays on its device; any other network takes numpy arrays."""

    arrays: ArrayOps


class StageTimer:
    """Wall-clock milliseconds per stage of one query; a stage entered twice adds up."""

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - start) * 1e3)

    def add(self, name: str, milliseconds: float) -> None:
        self._ms[name] = self._ms.get(name, 0.0) + milliseconds

    def as_dict(self) -> dict[str, float]:
        return dict(self._ms)
