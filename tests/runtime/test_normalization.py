import json
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.platforms import PLATFORMS, PlatformSpec, platform_spec
from cosmos_edge.runtime.policy.normalization import PROPRIO_LIMIT, DatasetStats


def _official_json(platform: PlatformSpec, seed: int = 0) -> dict[str, list[float]]:
    """The layout `calculate_dataset_statistics` writes: five statistics for actions and for proprio."""
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, dim in (("actions", platform.action_dim), ("proprio", platform.proprio_dim)):
        samples = rng.normal(size=(100, dim)) * rng.uniform(0.1, 3.0, dim)
        data[f"{prefix}_min"] = samples.min(0).tolist()
        data[f"{prefix}_max"] = samples.max(0).tolist()
        data[f"{prefix}_mean"] = samples.mean(0).tolist()
        data[f"{prefix}_std"] = samples.std(0).tolist()
        data[f"{prefix}_median"] = np.median(samples, 0).tolist()
    return data


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("name", sorted(PLATFORMS))
def test_load_and_round_trip(tmp_path: Path, name: str) -> None:
    platform = platform_spec(name)
    data = _official_json(platform)
    stats = DatasetStats.from_json(_write(tmp_path, data), platform)
    assert stats.action_dim == platform.action_dim and stats.proprio_dim == platform.proprio_dim
    np.testing.assert_array_equal(stats.proprio_median, data["proprio_median"])

    raw = np.random.default_rng(1).uniform(stats.proprio_min, stats.proprio_max, (4, platform.proprio_dim))
    normalized = stats.normalize_proprio(raw)
    assert normalized.dtype == np.float64 and np.all(np.abs(normalized) <= 1.0)
    np.testing.assert_allclose(stats.unnormalize_proprio(normalized), raw, rtol=0, atol=1e-12)

    # The official line on the float32 mean of the latent's copies: numpy keeps 0.5 * (a + 1) in float32.
    rng = np.random.default_rng(2)
    actions = rng.uniform(-1.2, 1.2, (platform.chunk_size, platform.action_dim)).astype(np.float32)
    expected = 0.5 * (actions + 1) * (stats.actions_max - stats.actions_min) + stats.actions_min
    assert expected.dtype == np.float64
    np.testing.assert_array_equal(stats.unnormalize_actions(actions), expected)


def test_normalize_matches_official_formula_without_clipping(tmp_path: Path) -> None:
    platform = platform_spec("libero")
    stats = DatasetStats.from_json(_write(tmp_path, _official_json(platform)), platform)
    outside = stats.proprio_max + 1.0
    expected = 2 * ((outside - stats.proprio_min) / (stats.proprio_max - stats.proprio_min)) - 1
    np.testing.assert_array_equal(stats.normalize_proprio(outside), expected)
    assert np.all(expected > 1.0)


def test_write_json_round_trip(tmp_path: Path) -> None:
    stats = DatasetStats(
        actions_min=[-1.0, 0.0], actions_max=[1.0, 0.5], proprio_min=[0.0], proprio_max=[2.0], proprio_mean=[1.0]
    )
    stats.write_json(tmp_path / "out.json")
    written = json.loads((tmp_path / "out.json").read_text())
    assert sorted(written) == ["actions_max", "actions_min", "proprio_max", "proprio_mean", "proprio_min"]
    assert written["actions_max"] == [1.0, 0.5]
    assert not stats.proprio_min.flags.writeable


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"proprio_min": [0.0, 2.0]}, r"proprio_min/proprio_max: expected min < .* at dim 1"),
        ({"proprio_min": [0.0, 1.0]}, r"proprio_min/proprio_max: expected min < .*min 1.0 and max 1.0 at dim 1"),
        ({"actions_min": [3.0]}, r"actions_min/actions_max: expected min < max .* at dim 0"),
        # A constant action dimension cannot come from training, whose normalisation divides by max - min.
        ({"actions_min": [1.0]}, r"actions_min/actions_max: expected min < max .*min 1.0 and max 1.0 at dim 0"),
        ({"actions_max": [1.0, 2.0]}, r"actions_max: expected 1 values like actions_min, got 2"),
        ({"proprio_std": [1.0]}, r"proprio_std: expected 2 values like proprio_min, got 1"),
        ({"actions_max": [float("nan")]}, r"actions_max: expected finite numbers, got nan at dim 0"),
        ({"actions_min": [[0.0]]}, r"actions_min: expected a non-empty 1-D list"),
        ({"actions_min": "abc"}, r"actions_min: expected a list of numbers"),
        ({"proprio_max": None}, r"proprio_max: expected a list of numbers, got null"),
        ({"proprio_max": [1.0, None]}, r"proprio_max: expected finite numbers, got null at dim 1"),
    ],
)
def test_invalid_statistics_name_the_field_and_dim(change: dict, message: str) -> None:
    base = {"actions_min": [0.0], "actions_max": [1.0], "proprio_min": [0.0, 0.0], "proprio_max": [1.0, 1.0]}
    with pytest.raises(ConfigError, match=message):
        DatasetStats(**{**base, **change})


def test_dims_are_checked_against_the_platform(tmp_path: Path) -> None:
    data = _official_json(platform_spec("aloha"))
    with pytest.raises(
        ConfigError,
        match="libero expects action_dim 7 and proprio_dim 9, got 14 and 14: the statistics of another platform, "
        "or the wrong platform named",
    ):
        DatasetStats.from_json(_write(tmp_path, data), platform_spec("libero"))


def test_a_statistic_of_another_length_than_the_others_is_the_one_named(tmp_path: Path) -> None:
    data = _official_json(platform_spec("aloha"))
    data["proprio_min"] = data["proprio_min"][:5]  # the odd one: named, not the max compared with it
    with pytest.raises(ConfigError, match=r"proprio_min: expected 14 values \(aloha's proprio dim\), got 5"):
        DatasetStats.from_json(_write(tmp_path, data), platform_spec("aloha"))


def test_file_errors(tmp_path: Path) -> None:
    platform = platform_spec("libero")
    with pytest.raises(ConfigError, match="cannot read"):
        DatasetStats.from_json(tmp_path / "absent.json", platform)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not a JSON text file"):
        DatasetStats.from_json(tmp_path / "bad.json", platform)
    data = _official_json(platform)
    del data["proprio_max"]
    with pytest.raises(ConfigError, match=r"missing keys \['proprio_max'\]"):
        DatasetStats.from_json(_write(tmp_path, data), platform)
    data["proprio_max"], data["proprio_std"] = None, None  # null: refused where required, absent where optional
    with pytest.raises(ConfigError, match=r"\.json: proprio_max: expected a list of numbers, got null"):
        DatasetStats.from_json(_write(tmp_path, data), platform)


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    platform = platform_spec("libero")
    stats = DatasetStats.from_json(_write(tmp_path, {**_official_json(platform), "num_transitions": 5}), platform)
    assert stats.proprio_dim == 9


@pytest.mark.parametrize(
    ("proprio", "message"),
    [
        (np.zeros(8), r"proprio: expected shape \[\.\.\., 9\], got \[8\]"),
        (np.float64(0.0), r"proprio: expected shape \[\.\.\., 9\], got \[\]"),
        (np.array([0.0] * 8 + [np.nan]), r"proprio: expected finite values, got nan at index \[8\]"),
        (["a"] * 9, r"proprio: expected numbers \[\.\.\., 9\], got dtype <U1"),
        (np.zeros(9, np.complex64), r"proprio: expected numbers \[\.\.\., 9\], got dtype complex64"),
        (np.zeros(9, bool), r"proprio: expected numbers \[\.\.\., 9\], got dtype bool"),
        ([[0.0] * 9, [0.0]], r"proprio: expected numbers \[\.\.\., 9\], got list"),
    ],
)
def test_bad_proprio_is_an_input_error(tmp_path: Path, proprio: object, message: str) -> None:
    platform = platform_spec("libero")
    stats = DatasetStats.from_json(_write(tmp_path, _official_json(platform)), platform)
    with pytest.raises(InputError, match=message) as caught:
        stats.normalize_proprio(proprio)
    assert caught.value.field == "proprio"


def test_proprio_far_outside_the_dataset_range_is_refused(tmp_path: Path) -> None:
    """Within ±PROPRIO_LIMIT normalised it is computed as the official code does; a value beyond names its index
    and the dimension's range (1e30 once reached the DiT and came back as NaN actions)."""
    platform = platform_spec("libero")
    stats = DatasetStats.from_json(_write(tmp_path, _official_json(platform)), platform)
    span = stats.proprio_max - stats.proprio_min
    low = stats.proprio_min - span * (0.99 * PROPRIO_LIMIT - 1) / 2  # normalised -0.99 PROPRIO_LIMIT
    np.testing.assert_allclose(stats.normalize_proprio(low), -0.99 * PROPRIO_LIMIT)
    for far in (1e30, stats.proprio_max[3] + span[3] * PROPRIO_LIMIT):
        proprio = stats.proprio_min.copy()
        proprio[3] = far
        with pytest.raises(
            InputError, match=r"proprio: .* at index \[3\] lies far outside the dataset range"
        ) as caught:
            stats.normalize_proprio(proprio)
        assert caught.value.field == "proprio"
