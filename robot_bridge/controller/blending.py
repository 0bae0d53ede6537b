"""Continuous commands across chunk boundaries: blend a newly adopted chunk with the trajectory it replaces.

A new chunk is computed from a newer observation, so its action for the switching tick generally differs from the
old chunk's action for that tick; switching hard makes the commanded trajectory jump (the top complaint about the
official client on real arms). Two schemes, both keeping the executor's time alignment:

* `crossfade` (default): over `window_ticks` ticks the target moves linearly from the old trajectory to the new
  chunk, new weight (j + 1) / (window + 1) at the j-th tick after the switch. After the window the new chunk is
  followed exactly. Where the old trajectory is at rest (a hold, or the old chunk ran out), the fade closes the gap
  it had when it stopped, moving as the new chunk does: weighing a pose at rest against a moving chunk would speed
  the arm up to (2 window + 1) / (window + 1) of the chunk's speed by the end of the window.
* `ensemble`: ACT-style temporal ensembling, exponential weights exp(-m·i) with i = 0 for the older prediction, for
  every tick both chunks cover; the older chunk dominates (m > 0). At the switch the new chunk takes
  e^-m / (1 + e^-m) of the gap at once (38 % for m = 0.5): continuous only with a new chunk every tick, as ACT
  queries. Over its last `window_ticks` ticks the old chunk's weight ramps down to 0, so the target reaches the new
  chunk alone without a jump when the old chunk runs out. A chunk adopted when the old one has `window_ticks` ticks
  or fewer left fades in as under `crossfade`.

The old trajectory is the replaced chunk, held at its last action once it runs out, and shifted by what was
commanded at the switch minus that chunk's action then: zero after a finished fade, the remaining gap when a chunk
comes in the middle of one (or the safety filter limited the pose), which the new blend then closes as the old
chunk moves on (a constant pose there instead would make frequent chunks trail their trajectory). Without a chunk
in hand (a hold, or the start) it is the last commanded pose, so the first chunk after a hold fades in under both
schemes.

A non-finite action of the old chunk is not blended from: its latest finite action before it stands in (the pose
commanded at the switch if there is none). An optional first-order low-pass (`lowpass_alpha`) smooths the blended
target before the safety filter; after a hold or a non-finite target (the new chunk's: the safety filter holds it)
it starts again from the last commanded pose.
Ticks the executor skipped (it ran late) move the chunk in hand ahead by as many actions; `rejoin` cross-fades
into it from the chunk delayed by them, under either scheme.
`benchmarks/blending.py` measures both schemes on scripted chunks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum

import numpy as np

from cosmos_edge.runtime.checks import check_integer, check_number
from cosmos_edge.runtime.errors import ConfigError


class BlendScheme(str, Enum):
    NONE = "none"
    CROSSFADE = "crossfade"
    ENSEMBLE = "ensemble"


@dataclass(frozen=True)
class BlendConfig:
    """How the executor joins chunks. Defaults: an 8-tick (0.32 s at 25 Hz) cross-fade, no low-pass.

    Args:
        scheme: `crossfade`, `ensemble` or `none` (hard switch, as the official client).
        window_ticks: cross-fade length; also how long a boundary's statistics are collected.
        ensemble_decay: m of the ensemble weights exp(-m·i); 0 averages both chunks equally.
        lowpass_alpha: None, or the weight in (0, 1] of the new target in y ← y + α·(x − y) each tick.
    """

    scheme: BlendScheme = BlendScheme.CROSSFADE
    window_ticks: int = 8
    ensemble_decay: float = 0.5
    lowpass_alpha: float | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "scheme", BlendScheme(self.scheme))  # its value ("crossfade") will do
        except ValueError:
            raise ConfigError(
                f"blend.scheme: expected one of {[s.value for s in BlendScheme]}, got {self.scheme!r}"
            ) from None
        check_integer("blend.window_ticks", self.window_ticks, 1)
        check_number("blend.ensemble_decay", self.ensemble_decay, 0)
        if self.lowpass_alpha is not None:
            check_number("blend.lowpass_alpha", self.lowpass_alpha, 0, 1, above_low=True)


@dataclass(frozen=True)
class Boundary:
    """One chunk switch. `raw_jump`: max |new chunk's action − old trajectory| over the arm joints at the switch
    tick (what a hard switch would command); `commanded_jump`: the largest per-tick change of the commanded arm
    joints over the switch tick and the `window_ticks` after it (a cross-fade closes the gap in window_ticks + 1
    equal steps), and for `ensemble` until the old chunk has run out; `gripper_raw_jump`, `gripper_commanded_jump`:
    the same of the grippers (another unit: a normalised opening, which no slew limit bounds); `safety_ticks`: ticks
    of that span the safety filter rate-limited or clamped."""

    tick: int
    raw_jump: float
    commanded_jump: float
    safety_ticks: int
    gripper_raw_jump: float = 0.0
    gripper_commanded_jump: float = 0.0


@dataclass
class _OpenBoundary:
    """A boundary whose statistics are still being collected."""

    tick: int
    raw_jump: np.ndarray  # (arm joints, grippers)
    largest_step: np.ndarray
    safety_ticks: int
    previous: np.ndarray | None  # the last command
    closes: int  # the tick after which it closes


_BOUNDARIES_KEPT = 1024  # about 17 minutes of ALOHA at 25 Hz, a chunk adopted every 25 ticks (the prefetch point)


class ChunkBlender:
    """The target of each tick from the chunk in hand and the one it replaced; records every boundary.

    Owned by the executor's control thread (not thread-safe).
    """

    def __init__(self, config: BlendConfig, gripper_dims: tuple[int, ...] = ()) -> None:
        """`gripper_dims`: the action dimensions of grippers, whose boundary statistics are kept apart."""
        self.config = config
        self._gripper_dims = gripper_dims
        self._grippers: np.ndarray | None = None  # their mask over an action
        self._old: np.ndarray | None = None  # the replaced chunk, indexed from `_old_first_tick`
        self._old_first_tick = 0
        self._old_shift: np.ndarray | float = 0.0  # added to the replaced chunk: see the module docstring
        self._hold: np.ndarray | None = None  # the last commanded pose at the switch
        self._switch_tick = 0
        self._fade_only = False  # a rejoin's blend: a cross-fade under either scheme
        self._gap: np.ndarray | None = None  # old trajectory minus new chunk, the last tick the old one moved
        self._lowpassed: np.ndarray | None = None
        self._open: _OpenBoundary | None = None
        self._boundaries: deque[Boundary] = deque(maxlen=_BOUNDARIES_KEPT)

    def boundaries(self) -> list[Boundary]:
        """Every boundary, oldest first: the last one as collected so far when its window is still open (a run that
        ends, or stops, within it: the report of a stop the boundary caused must hold it)."""
        open_now = [] if self._open is None else [_finished(self._open)]
        return [*self._boundaries, *open_now]

    def switch(
        self,
        tick: int,
        new_actions: np.ndarray,
        new_first_tick: int,
        old_actions: np.ndarray | None,
        old_first_tick: int,
        last_command: np.ndarray | None,
        skipped: int = 0,
    ) -> None:
        """A new chunk is adopted at `tick`; the chunk in hand until now was `old_actions` (None: holding). After
        `skipped` ticks (see `rejoin`) the old chunk is delayed by them and the new one fades in, whatever the
        scheme but `none`."""
        self._close_boundary()
        self._blend_from(tick, old_actions, old_first_tick + skipped, last_command, fade_only=skipped > 0)
        previous = self._old_trajectory(tick, hold_past_end=True)
        new = np.asarray(new_actions[tick - new_first_tick], dtype=np.float64)
        # A non-finite action (which the safety filter holds) has no jump to speak of: its dims count as 0.
        changes = None if previous is None else np.abs(new - previous)
        raw = np.zeros(2) if changes is None else self._largest(np.where(np.isfinite(changes), changes, 0.0))
        closes = tick + self.config.window_ticks
        if self.config.scheme is BlendScheme.ENSEMBLE and old_actions is not None and not skipped:
            closes = max(closes, old_first_tick + len(old_actions))  # the tick the old chunk's weight reaches 0
        self._open = _OpenBoundary(tick, raw, np.zeros(2), 0, self._hold, closes)

    def rejoin(self, tick: int, skipped: int, actions: np.ndarray, first_tick: int, last_command: np.ndarray) -> None:
        """`skipped` ticks were skipped (the robot's calls or this machine ran late), so the chunk in hand
        (`actions` from `first_tick`) jumped ahead: from `tick` the target cross-fades (whatever the scheme but
        `none`, which jumps as the official client would) from the chunk delayed by the skipped ticks, continuing
        from `last_command`, into the chunk itself, so each step moves as the chunk does plus 1 / (window + 1) of
        the skipped motion. This is no chunk boundary: one still open goes on collecting its statistics."""
        self._blend_from(tick, actions, first_tick + skipped, last_command, fade_only=True)

    def _blend_from(
        self,
        tick: int,
        old_actions: np.ndarray | None,
        old_first_tick: int,
        last_command: np.ndarray | None,
        fade_only: bool,
    ) -> None:
        """From `tick` the old trajectory is `old_actions` from `old_first_tick`, shifted to pass through
        `last_command` the tick before (see the module docstring)."""
        self._old, self._old_first_tick, self._old_shift = old_actions, old_first_tick, 0.0
        self._hold = None if last_command is None else np.asarray(last_command, dtype=np.float64)
        self._switch_tick, self._fade_only, self._gap = tick, fade_only, None
        if self._hold is not None and old_actions is not None:
            followed = self._old_trajectory(tick - 1, hold_past_end=True)  # what the old chunk asked for last tick
            if followed is not None and np.isfinite(self._hold).all():
                self._old_shift = self._hold - followed

    def target(self, tick: int, action: np.ndarray | None, last_command: np.ndarray | None) -> np.ndarray | None:
        """The command target for `tick`, given the adopted chunk's `action` for it (None: nothing to do) and the
        last pose commanded (where the low-pass restarts)."""
        if action is None:
            self._lowpassed = None  # holding: restart the filter from the next target
            return None
        target = self._blended(tick, np.asarray(action, dtype=np.float64))
        alpha = self.config.lowpass_alpha
        if alpha is not None:
            previous = next((pose for pose in (self._lowpassed, last_command) if pose is not None), target)
            target = previous + alpha * (target - previous)
            # A non-finite target is held by the safety filter; the filter restarts from the next finite one.
            self._lowpassed = target if np.isfinite(target).all() else None
        return target

    def observe_command(self, tick: int, command: np.ndarray, safety_intervened: bool) -> None:
        """Feeds the boundary statistics with what was actually commanded at `tick` (the safety filter's output:
        finite, and a fresh array the blender may keep)."""
        boundary = self._open
        if boundary is None:
            return
        if boundary.previous is not None:
            boundary.largest_step = np.maximum(
                boundary.largest_step, self._largest(np.abs(command - boundary.previous))
            )
        boundary.safety_ticks += int(safety_intervened)
        boundary.previous = command
        if tick >= boundary.closes:  # a fade's window_ticks + 1 steps are in (an ensemble's old chunk has run out)
            self._close_boundary()

    def end_boundary(self) -> None:
        """Closes the boundary in progress with the ticks it ran (a pause: the next command follows no trajectory of
        the last one, so their difference is no step of the boundary)."""
        self._close_boundary()

    def _largest(self, changes: np.ndarray) -> np.ndarray:
        """The largest of `changes` over the arm joints, and over the grippers (0 without any)."""
        if self._grippers is None or len(self._grippers) != len(changes):  # made once per action width
            self._grippers = np.zeros(len(changes), bool)
            self._grippers[list(self._gripper_dims)] = True
        grippers = self._grippers
        arms = float(changes[~grippers].max()) if not grippers.all() else 0.0
        return np.array([arms, float(changes[grippers].max()) if grippers.any() else 0.0])

    def _blended(self, tick: int, new: np.ndarray) -> np.ndarray:
        scheme, window = self.config.scheme, self.config.window_ticks
        since = tick - self._switch_tick
        # An ensemble fades in too where its old chunk could not weigh against the new one: none in hand (a hold),
        # or it runs out within the window, its weight already ramping down (the new chunk would take most of the
        # gap in one tick).
        old_ends = self._old is None or self._old_first_tick + len(self._old) <= self._switch_tick + window
        fading = scheme is BlendScheme.CROSSFADE or (scheme is BlendScheme.ENSEMBLE and (old_ends or self._fade_only))
        if fading and since < window:
            weight = (since + 1) / (window + 1)
            if self._old_moves_at(tick):
                old = self._old_trajectory(tick, hold_past_end=True)
                assert old is not None
                self._keep_gap(old - new)
                return (1.0 - weight) * old + weight * new
            if self._gap is None and (old := self._old_trajectory(tick, hold_past_end=True)) is not None:
                self._keep_gap(old - new)  # at rest from the switch on
            if self._gap is not None:
                return new + (1.0 - weight) * self._gap
        if scheme is BlendScheme.ENSEMBLE and self._old is not None and not self._fade_only:
            remaining = self._old_first_tick + len(self._old) - tick  # ticks the old chunk still covers, this one too
            old = self._old_trajectory(tick, hold_past_end=False)
            if remaining > 0 and old is not None:
                old_weight = min(1.0, remaining / (window + 1))
                new_weight = math.exp(-self.config.ensemble_decay)
                return (old_weight * old + new_weight * new) / (old_weight + new_weight)
        return new

    def _old_moves_at(self, tick: int) -> bool:
        """Whether the old trajectory follows a chunk at `tick`: its own finite action, or its first one still to
        come (it moves from then on: a gap frozen until then would jump when it starts)."""
        index = tick - self._old_first_tick
        if self._old is None or index >= len(self._old):
            return False
        return bool(np.isfinite(self._old[max(index, 0)]).all())

    def _keep_gap(self, gap: np.ndarray) -> None:
        if np.isfinite(gap).all():  # a non-finite new action is held by the safety filter, not faded from
            self._gap = gap

    def _old_trajectory(self, tick: int, hold_past_end: bool) -> np.ndarray | None:
        if self._old is None:
            return self._hold if hold_past_end else None
        index = tick - self._old_first_tick
        if index >= len(self._old) and not hold_past_end:
            return None
        # The latest finite action up to this tick's (a non-finite one is not blended from), else the switch pose.
        for row in range(min(max(index, 0), len(self._old) - 1), -1, -1):
            action = np.asarray(self._old[row], dtype=np.float64)
            if np.isfinite(action).all():
                return action + self._old_shift
        return self._hold

    def _close_boundary(self) -> None:
        boundary, self._open = self._open, None
        if boundary is not None:
            self._boundaries.append(_finished(boundary))


def _finished(boundary: _OpenBoundary) -> Boundary:
    raw, largest = boundary.raw_jump, boundary.largest_step
    return Boundary(boundary.tick, raw[0], largest[0], boundary.safety_ticks, raw[1], largest[1])


@dataclass(frozen=True)
class BoundarySummary:
    """Medians and maxima of the boundaries' jumps: the arm joints' (rad) and the grippers'."""

    boundaries: int
    raw_jump_p50: float
    raw_jump_max: float
    commanded_jump_p50: float
    commanded_jump_max: float
    safety_ticks: int
    gripper_raw_jump_max: float = 0.0
    gripper_commanded_jump_max: float = 0.0


def summarize_boundaries(boundaries: list[Boundary]) -> BoundarySummary:
    def column(name: str) -> np.ndarray:
        return np.array([getattr(b, name) for b in boundaries]) if boundaries else np.zeros(1)

    raw, commanded = column("raw_jump"), column("commanded_jump")
    return BoundarySummary(
        boundaries=len(boundaries),
        raw_jump_p50=float(np.median(raw)),
        raw_jump_max=float(raw.max()),
        commanded_jump_p50=float(np.median(commanded)),
        commanded_jump_max=float(commanded.max()),
        safety_ticks=sum(b.safety_ticks for b in boundaries),
        gripper_raw_jump_max=float(column("gripper_raw_jump").max()),
        gripper_commanded_jump_max=float(column("gripper_commanded_jump").max()),
    )
