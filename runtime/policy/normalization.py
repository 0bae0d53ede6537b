"""Action/proprio min-max normalisation with the official dataset statistics JSON.

The official file (`{libero,robocasa,aloha}_dataset_statistics.json`, written by CP `datasets/dataset_utils.py`
`calculate_dataset_statistics`) holds per-dimension lists `actions_{min,max,mean,std,median}` and
`proprio_{min,max,mean,std,median}`; inference uses only min and max (CP `cosmos_utils.py` `rescale_proprio`,
`unnormalize_actions`). The official code loads the lists as float64 arrays and computes in float64 (but for the
first half of the action formula, in the float32 of the actions); so does this module. No clipping anywhere, as in
the official code.

Constant dimensions (min == max) are rejected when the statistics are loaded: the official proprio normalisation
divides by zero there (NaN/inf into the model), and a constant action dimension, though its un-normalisation is well
defined (it returns the constant), would carry no action at all, which only a wrong statistics file gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import PlatformSpec

# The only statistics inference uses; mean/std/median are kept when present.
REQUIRED_KEYS = ("actions_min", "actions_max", "proprio_min", "proprio_max")

# Normalised proprio beyond ±PROPRIO_LIMIT (500 dataset ranges outside the range) is refused. The official code
# computes on anything; but such a value is a unit or field-order mistake, the policy's answer to it is meaningless,
# and far enough out (~1e19) the DiT's float arithmetic overflows into NaN actions that would hide the cause.
PROPRIO_LIMIT = 1e3

# Normalised proprio beyond ±PROPRIO_WARN (a dataset range or more outside the range) is served, with a warning: the
# policy never saw such a state, and joints in degrees against statistics in radians (57.3 times the value) land there
# while staying below PROPRIO_LIMIT.
PROPRIO_WARN = 3.0


@dataclass(frozen=True, eq=False)
class DatasetStats:
    """Per-dimension statistics, float64 and read-only. Field names are the JSON keys."""

    actions_min: np.ndarray
    actions_max: np.ndarray
    proprio_min: np.ndarray
    proprio_max: np.ndarray
    actions_mean: np.ndarray | None = None
    actions_std: np.ndarray | None = None
    actions_median: np.ndarray | None = None
    proprio_mean: np.ndarray | None = None
    proprio_std: np.ndarray | None = None
    proprio_median: np.ndarray | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in REQUIRED_KEYS:  # JSON null
                raise ConfigError(f"{field.name}: expected a list of numbers, got null")
            if value is not None:
                object.__setattr__(self, field.name, _as_stat_vector(field.name, value))
        for prefix in ("actions", "proprio"):
            dim = getattr(self, f"{prefix}_min").shape[0]
            for suffix in ("max", "mean", "std", "median"):
                value = getattr(self, f"{prefix}_{suffix}")
                if value is not None and value.shape[0] != dim:
                    raise ConfigError(
                        f"{prefix}_{suffix}: expected {dim} values like {prefix}_min, got {value.shape[0]}"
                    )
        _check_ordered("actions", self.actions_min, self.actions_max)
        _check_ordered("proprio", self.proprio_min, self.proprio_max)

    @property
    def action_dim(self) -> int:
        return self.actions_min.shape[0]

    @property
    def proprio_dim(self) -> int:
        return self.proprio_min.shape[0]

    @classmethod
    def from_json(cls, path: str | Path, platform: PlatformSpec) -> DatasetStats:
        """Loads an official statistics file and checks its dimensions against `platform`. Unknown keys are ignored."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except OSError as error:
            raise ConfigError(f"dataset statistics {path}: cannot read: {error}") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a binary file (a checkpoint given by mistake)
            raise ConfigError(f"dataset statistics {path}: not a JSON text file: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"dataset statistics {path}: expected a JSON object, got {type(raw).__name__}")
        missing = [name for name in REQUIRED_KEYS if name not in raw]
        if missing:
            raise ConfigError(f"dataset statistics {path}: missing keys {missing}")
        _check_lengths_agree(raw, platform, f"dataset statistics {path}")
        try:
            stats = cls(**{field.name: raw[field.name] for field in fields(cls) if field.name in raw})
        except ConfigError as error:
            raise ConfigError(f"dataset statistics {path}: {error}") from error
        stats.check_platform(platform, f"dataset statistics {path}")
        return stats

    def check_platform(self, platform: PlatformSpec, name: str) -> None:
        """Raises ConfigError unless these statistics have `platform`'s action and proprio dims (`name`: whose)."""
        if self.action_dim != platform.action_dim or self.proprio_dim != platform.proprio_dim:
            raise ConfigError(
                f"{name}: {platform.name} expects action_dim {platform.action_dim} and proprio_dim "
                f"{platform.proprio_dim}, got {self.action_dim} and {self.proprio_dim}: the statistics of another "
                "platform, or the wrong platform named"
            )

    def write_json(self, path: str | Path) -> None:
        """Writes the official JSON layout (lists of floats; absent optional statistics are left out)."""
        data = {field.name: getattr(self, field.name) for field in fields(self)}
        Path(path).write_text(json.dumps({k: v.tolist() for k, v in data.items() if v is not None}, indent=2))

    def normalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """Raw proprio [..., proprio_dim] → 2(x - min)/(max - min) - 1, float64 (official `rescale_proprio`)."""
        x = _check_input("proprio", proprio, self.proprio_dim, field="proprio")
        normalized = 2.0 * ((x - self.proprio_min) / (self.proprio_max - self.proprio_min)) - 1.0
        far = np.argwhere(np.abs(normalized) > PROPRIO_LIMIT)
        if far.size:
            index = tuple(int(i) for i in far[0])
            dim = index[-1]
            raise InputError(
                f"proprio: {x[index]:g} at index {list(index)} lies far outside the dataset range "
                f"[{self.proprio_min[dim]:g}, {self.proprio_max[dim]:g}] of dim {dim} (normalised "
                f"{normalized[index]:.3g}, accepted within ±{PROPRIO_LIMIT:g}); check its units and joint order",
                field="proprio",
            )
        return normalized

    def unnormalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        """Normalised proprio [..., proprio_dim] → raw scale, float64 (inverse of `normalize_proprio`)."""
        x = _check_input("proprio", proprio, self.proprio_dim, finite=False)  # the future proprio a network predicted
        return 0.5 * (x + 1.0) * (self.proprio_max - self.proprio_min) + self.proprio_min

    def unnormalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Normalised float32 actions [..., action_dim] (the latent's dtype) → 0.5(a + 1)(max - min) + min, float64,
        in the official numpy arithmetic (`cosmos_utils.py` 641-645): 0.5(a + 1) in float32, the rest in float64."""
        x = _check_input("actions", actions, self.action_dim, finite=False).astype(np.float32)
        half = np.float32(0.5) * (x + np.float32(1.0))
        return half * (self.actions_max - self.actions_min) + self.actions_min


def _check_lengths_agree(raw: dict[str, Any], platform: PlatformSpec, name: str) -> None:
    """Names the statistic whose length differs from the others of its kind, measured against the platform's dim
    (else `DatasetStats` would blame whichever key it compares with the `_min` one, the `_min` itself included)."""
    dims = {"actions": platform.action_dim, "proprio": platform.proprio_dim}
    for prefix, dim in dims.items():
        lengths = {
            key: len(value)
            for key in (field.name for field in fields(DatasetStats) if field.name.startswith(f"{prefix}_"))
            if isinstance(value := raw.get(key), list)
        }
        if len(set(lengths.values())) > 1:
            key = next((key for key, length in lengths.items() if length != dim), next(iter(lengths)))
            raise ConfigError(
                f"{name}: {key}: expected {dim} values ({platform.name}'s {prefix} dim), got {lengths[key]}"
            )


def _as_stat_vector(name: str, value: object) -> np.ndarray:
    if isinstance(value, list) and None in value:  # JSON null, which numpy would read as NaN
        raise ConfigError(f"{name}: expected finite numbers, got null at dim {value.index(None)}")
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{name}: expected a list of numbers, got {str(value)[:80]}") from error
    if array.ndim != 1 or array.shape[0] == 0:
        raise ConfigError(f"{name}: expected a non-empty 1-D list of numbers, got shape {list(array.shape)}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ConfigError(f"{name}: expected finite numbers, got {array[bad[0]]} at dim {int(bad[0])}")
    array.setflags(write=False)
    return array


def _check_ordered(prefix: str, low: np.ndarray, high: np.ndarray) -> None:
    # Strictly: normalisation divides by max - min, and a constant dimension would carry no action at all.
    bad = np.flatnonzero(low >= high)
    if bad.size:
        dim = int(bad[0])
        raise ConfigError(
            f"{prefix}_min/{prefix}_max: expected min < max in every dim (normalisation divides by max - min), "
            f"got min {low[dim]} and max {high[dim]} at dim {dim}"
        )


def _check_input(name: str, values: np.ndarray, dim: int, field: str = "", *, finite: bool = True) -> np.ndarray:
    """`values` as float64 [..., dim], finite unless `finite` is False (a network's output, whose NaN is the
    network's failure for its policy to report, not a bad request); `field`: the request field they came from (none
    for outputs)."""
    try:
        given = np.asarray(values)
        array = given.astype(np.float64) if given.dtype.kind in "iuf" else None  # no bool, complex or text
    except (TypeError, ValueError) as error:  # a ragged sequence
        raise InputError(f"{name}: expected numbers [..., {dim}], got {type(values).__name__}", field) from error
    if array is None:
        raise InputError(f"{name}: expected numbers [..., {dim}], got dtype {given.dtype}", field)
    if array.ndim == 0 or array.shape[-1] != dim:
        raise InputError(f"{name}: expected shape [..., {dim}], got {list(array.shape)}", field)
    if finite and (bad := np.argwhere(~np.isfinite(array))).size:
        raise InputError(
            f"{name}: expected finite values, got {array[tuple(bad[0])]} at index {bad[0].tolist()}", field
        )
    return array
