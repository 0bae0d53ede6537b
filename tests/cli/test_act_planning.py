"""`act --mode planning`: the offline planning query, with official options as flags, written to the output .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.value_aggregation import select_best_candidate
from tests.helpers.observations import random_observation


def test_an_offline_planning_query_writes_every_candidate(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    files = tiny_assets["aloha"]
    observation = random_observation("aloha", seed=6)
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)  # type: ignore[arg-type]
    argv = ["act", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer)]
    argv += ["--stats", str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--observation", str(tmp_path / "obs.npz"), "--task", "fold the t-shirt", "--mode", "planning"]
    argv += ["--num-candidates", "3", "--num-denoising-steps-action", "1", "--num-denoising-steps-future-state", "1"]
    argv += ["--num-denoising-steps-value", "2", "--num-future-state-predictions-in-ensemble", "1"]
    argv += ["--num-value-predictions-in-ensemble", "2", "--value-ensemble-aggregation-scheme", "average"]
    argv += ["--return-all-query-results", "--planning-deadline-ms", "600000", "--future-images"]
    argv += ["--out", str(tmp_path / "result.npz")]
    assert main(argv) == 0
    with np.load(tmp_path / "result.npz") as result:
        values, chosen = result["candidate_values"], int(result["chosen_index"])
        assert values.shape == (3,) and result["candidate_values_by_depth"].shape == (3, 1)
        np.testing.assert_array_equal(result["candidate_actions_by_depth"][:, 0], result["candidate_actions"])
        assert chosen == select_best_candidate(values.tolist())
        np.testing.assert_array_equal(result["actions"], result["candidate_actions"][chosen])
        assert result["value"] == values[chosen]
        assert str(result["planning_outcome"]) == "complete"  # the deadline was met
        assert all(result[f"future_image_{camera}"].shape == (224, 224, 3) for camera in ("cam_high", "cam_left_wrist"))


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_a_deadline_must_be_a_positive_number_of_milliseconds(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["act", "--mode", "planning", "--planning-deadline-ms", value])
    assert exit_info.value.code == 2
    assert "--planning-deadline-ms: expected a positive finite number of milliseconds" in capsys.readouterr().err
