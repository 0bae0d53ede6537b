"""Defaults that work together: version, help, interrupted commands, the export target, planning from a bundle."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli import keys_cmd
from cosmos_edge.cli import main as cli_main
from cosmos_edge.cli.official_flags import parseable_flags
from cosmos_edge.cli.planning_args import add_planning_arguments, planning_config
from cosmos_edge.runtime.bundle.loader import planning_candidates
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.planning_config import PRESETS, planning_preset
from tests.helpers.observations import TinyBundles, random_observation


def test_version_and_a_user_facing_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.startswith("cosmos-edge ")
    with pytest.raises(SystemExit):
        cli_main.main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # as one line, whatever the terminal width
    assert "(default: tcp://127.0.0.1:5555)" in help_text and "--num-queries-best-of-n" in help_text


def test_a_source_tree_not_installed_runs_and_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == "cosmos-edge unknown (not installed; running from a source tree)\n"


def test_an_interrupted_command_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(keys_cmd, "_generate", interrupted)  # the parser is built after this, in main()
    assert cli_main.main(["keys", "generate", "unused"]) == 130
    assert capsys.readouterr().err.strip() == "cosmos-edge: interrupted (keys)"


def test_a_bf16_export_for_the_cpu_is_refused_before_exporting(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = tiny_assets["aloha"]
    argv = ["export", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer)]
    argv += ["--stats", str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--out", str(tmp_path / "bundle"), "--for", "cpu", "--precision", "bf16"]
    assert cli_main.main(argv) == 2
    assert "--precision bf16 --for cpu" in capsys.readouterr().err
    assert not (tmp_path / "bundle").exists()


def test_planning_from_a_bundle_uses_the_candidates_its_batch_sizes_serve(tiny_bundles: TinyBundles) -> None:
    source = BundleSource(tiny_bundles("aloha"))  # DiT batch sizes 1 and 2
    assert planning_candidates(source, ["cpu"], None, 8) == 2
    assert planning_candidates(source, ["cpu", "cpu"], None, 8) == 4  # two devices, two candidates each
    assert planning_candidates(source, ["cpu"], 2, 8) == 2
    assert planning_candidates(source, ["cpu"], None, 1) == 1  # a one-candidate preset
    with pytest.raises(
        ConfigError, match=r"^num_queries_best_of_n: 8 candidates over 1 device\(s\) need DiT batch sizes \[8\]"
    ) as caught:
        planning_candidates(source, ["cpu"], 8, 8)
    assert "lacks (it has [1, 2]); ask for 2 candidates, plan under a deadline" in str(caught.value)
    with pytest.raises(ConfigError, match=r"need DiT batch sizes \[3\].* ask for 2 or 3 or 4 candidates, plan"):
        planning_candidates(source, ["cpu", "cpu"], 5, 8)  # shares of 3 and 2


@pytest.mark.parametrize("flag", ["--num-candidates", "--num-queries-best-of-n"])
def test_more_candidates_than_a_bundle_fits_are_refused_naming_the_flag_as_typed(
    flag: str, tiny_bundles: TinyBundles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    observation = random_observation("aloha")
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    bundle = tiny_bundles("aloha")  # DiT batch sizes 1 and 2
    argv = ["act", "--bundle", str(bundle), "--observation", str(tmp_path / "obs.npz"), "--task", "fold the t-shirt"]
    assert cli_main.main([*argv, "--mode", "planning", flag, "8"]) == 2
    assert (
        f"cosmos-edge: error: {flag}: 8 candidates over 1 device(s) need DiT batch sizes [8]" in capsys.readouterr().err
    )


def test_act_planning_from_a_batch_1_bundle_says_why_not_and_what_would(
    tiny_bundles: TinyBundles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundles("aloha", batch_sizes=(1,))
    observation = random_observation("aloha")
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    argv = ["act", "--bundle", str(bundle), "--observation", str(tmp_path / "obs.npz"), "--task", "fold the t-shirt"]
    assert cli_main.main([*argv, "--mode", "planning"]) == 2
    assert (
        f"--mode planning: bundle {bundle} has DiT batch sizes [1], which fit no best of 2 to 8 candidates over 1 "
        "device(s); to plan, give --planning-deadline-ms" in capsys.readouterr().err
    )


def test_serve_says_how_many_candidates_a_bundle_allows_only_once_the_flags_hold(
    tiny_bundles: TinyBundles, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tiny_bundles("aloha")  # batch sizes 1 and 2: best of 2, not the preset's 8
    with caplog.at_level(logging.INFO):
        assert cli_main.main(["serve", "--bundle", str(bundle), "--image-size", "256x256"]) == 2
    assert "--image-size 256x256: an ALOHA server takes 224x224 frames" in capsys.readouterr().err
    assert not [record for record in caplog.records if record.getMessage().startswith("planning: best of")]


def test_planning_from_checkpoint_files_takes_any_number(tiny_assets: dict[str, CheckpointFiles]) -> None:
    source = CheckpointSource(tiny_assets["aloha"])
    assert planning_candidates(source, None, None, 8) == 8 and planning_candidates(source, None, 5, 8) == 5
    with pytest.raises(ConfigError, match=r"^num_queries_best_of_n: expected at least 1, got 0"):
        planning_candidates(source, None, 0, 8)  # not the preset's 8 in its place


@pytest.mark.parametrize(
    ("flags", "ignored"),
    [
        (["--no-use-ensemble-value-predictions"], True),
        (["--planning-preset", "base"], True),
        ([], False),
    ],
    ids=["no value ensemble", "base preset", "pooled"],
)
def test_an_aggregation_scheme_with_no_ensemble_to_pool_is_warned_of(
    flags: list[str], ignored: bool, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    args = parser.parse_args([*flags, "--value-ensemble-aggregation-scheme", "success_vote"])
    with caplog.at_level(logging.WARNING):
        planning_config(args)
    warned = [record.getMessage() for record in caplog.records if "has no effect" in record.getMessage()]
    assert len(warned) == int(ignored)


@pytest.mark.parametrize(("flags", "ignored"), [([], True), (["--no-ar-value-prediction"], False)])
def test_q_value_planning_under_a_value_function_is_warned_of(
    flags: list[str], ignored: bool, caplog: pytest.LogCaptureFixture
) -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    with caplog.at_level(logging.WARNING):
        planning_config(parser.parse_args([*flags, "--ar-qvalue-prediction"]))
    warned = [
        record.getMessage()
        for record in caplog.records
        if "--ar-qvalue-prediction has no effect" in record.getMessage()
    ]
    assert len(warned) == int(ignored)


def test_every_planning_flag_that_cannot_change_the_result_is_named_in_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    flags = ["--planning-preset", "base", "--num-candidates", "4", "--use-ensemble-value-predictions"]
    flags += ["--num-value-predictions-in-ensemble", "4", "--value-ensemble-aggregation-scheme", "lcb"]
    flags += ["--search-depth-value-aggregation-scheme", "average", "--num-denoising-steps-value", "9"]
    with caplog.at_level(logging.WARNING):
        planning_config(parser.parse_args(flags))
    (warned,) = [record.getMessage() for record in caplog.records if "no effect" in record.getMessage()]
    ranked_by_action = (
        "--use-ensemble-value-predictions, --num-value-predictions-in-ensemble, --value-ensemble-aggregation-scheme, "
        "--num-denoising-steps-value have no effect: candidates are ranked by their own action pass "
        "(--ar-value-prediction and --ar-qvalue-prediction are off)"
    )
    assert ranked_by_action in warned
    assert "--search-depth-value-aggregation-scheme has no effect: --search-depth is 1" in warned
    assert "--num-candidates" not in warned


_MAIN_UNUSED = {
    "ar_qvalue_prediction",
    "mask_future_state_for_qvalue_prediction",
    "search_depth_value_aggregation_scheme",
}


@pytest.mark.parametrize(
    ("overrides", "unused"),
    [
        ({}, _MAIN_UNUSED),  # V(s') ranks, one level deep
        ({"search_depth": 3}, _MAIN_UNUSED - {"search_depth_value_aggregation_scheme"}),
        (
            {"use_ensemble_future_state_predictions": False},
            _MAIN_UNUSED | {"num_future_state_predictions_in_ensemble", "future_state_ensemble_aggregation_scheme"},
        ),
        ({"num_value_predictions_in_ensemble": 1}, _MAIN_UNUSED | {"num_denoising_steps_value"}),
        (
            {"ar_value_prediction": False, "ar_qvalue_prediction": True},
            {"mask_current_state_action_for_value_prediction", "search_depth_value_aggregation_scheme"},
        ),
    ],
)
def test_unused_options_of_planning_configurations(overrides: dict[str, object], unused: set[str]) -> None:
    assert set(planning_preset("main", **overrides).unused_options()) == unused


# deploy.py's main planning command from its first planning flag on (its lines 74-94, but --seed 195, a flag of `act`
# and `serve` themselves), as an official user types them.
OFFICIAL_MAIN_PLANNING_FLAGS = [
    "--ar_future_prediction",
    "True",
    "--ar_value_prediction",
    "True",
    "--ar_qvalue_prediction",
    "False",
    "--use_jpeg_compression",  # the settings deploy.py's command interleaves with them: dropped as computed
    "False",
    "--flip_images",
    "False",
    "--num_denoising_steps_action",
    "10",
    "--num_denoising_steps_future_state",
    "5",
    "--num_denoising_steps_value",
    "5",
    "--deterministic",
    "True",
    "--search_depth",
    "1",
    "--value_ensemble_aggregation_scheme",
    "majority_mean",
    "--randomize_seed",
    "False",
    "--num_queries_best_of_n",
    "8",
    "--use_parallel_inference",
    "True",
    "--use_ensemble_value_predictions",
    "True",
    "--num_value_predictions_in_ensemble",
    "5",
    "--use_ensemble_future_state_predictions",
    "True",
    "--num_future_state_predictions_in_ensemble",
    "3",
    "--future_state_ensemble_aggregation_scheme",
    "average",
    "--mask_current_state_action_for_value_prediction",
    "True",
]


# The planning flags of deploy.py's depth-3 command (its lines 116-137) and its base command (lines 40-48), beyond
# those of the main command: values that ask for nothing (off, one, DeployConfig's default) where unused.
OFFICIAL_DEPTH3_PLANNING_FLAGS = [
    "--ar_future_prediction", "True", "--ar_value_prediction", "True", "--ar_qvalue_prediction", "False",
    "--num_denoising_steps_future_state", "5", "--num_denoising_steps_value", "5", "--search_depth", "3",
    "--search_depth_value_aggregation_scheme", "use_last_value", "--num_queries_best_of_n", "8",
    "--use_ensemble_value_predictions", "False", "--num_value_predictions_in_ensemble", "1",
    "--value_ensemble_aggregation_scheme", "average", "--use_ensemble_future_state_predictions", "False",
    "--num_future_state_predictions_in_ensemble", "1", "--future_state_ensemble_aggregation_scheme", "average",
    "--mask_current_state_action_for_value_prediction", "True",
]  # fmt: skip
OFFICIAL_BASE_PLANNING_FLAGS = [
    "--ar_future_prediction", "False", "--ar_value_prediction", "False", "--num_denoising_steps_future_state", "1",
    "--num_denoising_steps_value", "1",
]  # fmt: skip


@pytest.mark.parametrize(
    "flags",
    [OFFICIAL_MAIN_PLANNING_FLAGS, OFFICIAL_DEPTH3_PLANNING_FLAGS, OFFICIAL_BASE_PLANNING_FLAGS],
    ids=["main", "depth3", "base"],
)
def test_the_documented_official_commands_are_not_warned_of(flags: list[str], caplog: pytest.LogCaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    with caplog.at_level(logging.WARNING):
        planning_config(parser.parse_args(parseable_flags(["--planning-preset", "deploy-defaults", *flags])))
    assert not [record for record in caplog.records if "no effect" in record.getMessage()]


def test_official_planning_flags_over_the_deploy_defaults_give_the_main_preset() -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    flags = parseable_flags(["--planning-preset", "deploy-defaults", *OFFICIAL_MAIN_PLANNING_FLAGS])
    assert planning_config(parser.parse_args(flags)) == dataclasses.replace(
        PRESETS["main"], num_denoising_steps_action=10
    )
    spellings = [
        "--ar_value_prediction=false",
        "--ar_future_prediction",
        "--search_depth",
        "2",
        "--randomize_seed",
        "0",
    ]
    assert parseable_flags(spellings) == [
        "--no-ar-value-prediction",
        "--ar-future-prediction",  # a boolean alone is True
        "--search-depth",
        "2",
        "--no-randomize-seed",
    ]
    assert parseable_flags(["--task", "--search_depth", "--", "--search_depth"])[-1] == "--search_depth"


def test_the_settings_around_an_official_commands_planning_flags_are_accepted_as_cosmos_edge_computes_them() -> None:
    # deploy.py's main planning command interleaves these with its planning flags (its lines 78-88).
    settings = ["--use_jpeg_compression", "False", "--flip_images", "False", "--deterministic", "True"]
    settings += ["--use_parallel_inference", "True", "--chunk_size", "50", "--trained_with_image_aug=True"]
    assert parseable_flags([*settings, "--seed", "195", "--search_depth", "3"]) == [
        "--seed",
        "195",
        "--search-depth",
        "3",
    ]
    # A kebab-case boolean takes True or False after it as its official spelling does.
    assert parseable_flags(["--use-ensemble-value-predictions", "False", "--ar-value-prediction=yes"]) == [
        "--no-use-ensemble-value-predictions",
        "--ar-value-prediction",
    ]
    assert parseable_flags(["--ar-value-prediction", "obs.npz"]) == ["--ar-value-prediction", "obs.npz"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--use_jpeg_compression", "True"],
            "--use_jpeg_compression True: an official deploy.py setting; cosmos-edge "
            "computes the official ALOHA pipeline, that is --use_jpeg_compression False",
        ),
        (["--num_open_loop_steps=25"], "that is --num_open_loop_steps 50"),
        (["--chunk_size", "--seed", "3"], "--chunk_size: expected a value after it (the official commands give 50)"),
        (
            ["--ckpt_path", "nvidia/Cosmos-Policy-ALOHA-Predict2-2B"],
            "--ckpt_path: an official deploy.py option; cosmos-edge takes it as --checkpoint, the DiT's .pt file",
        ),
        (["--use_parallel_inference", "maybe"], "--use_parallel_inference: expected True or False after it"),
    ],
)
def test_official_settings_cosmos_edge_does_not_compute_or_takes_otherwise_are_refused_by_name(
    flags: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parseable_flags(flags)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--num_queries_best_of_n", "2", "--num-candidates", "3"], "given twice"),
        (["--search_depth_value_aggregation_scheme", "median"], "argument --search-depth-value-aggregation-scheme"),
        (["--value_ensemble_aggregation_scheme", "lcb", "--value-ensemble-aggregation-scheme=average"], None),
    ],
)
def test_official_planning_flags_are_checked_as_their_kebab_names(
    flags: list[str], named: str | None, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    add_planning_arguments(parser)
    if named is None:  # both spellings of one flag: the last wins, as for any flag given twice
        assert parser.parse_args(parseable_flags(flags)).value_ensemble_aggregation_scheme == "average"
        return
    with pytest.raises(SystemExit):
        parser.parse_args(parseable_flags(flags))
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--ar_value_prediction", "maybe"], ["--use_ensemble_value_predictions=obs.npz"]])
def test_an_official_boolean_flag_of_another_value_is_a_usage_error_naming_it(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["act", "--mode", "planning", *flags])
    assert exited.value.code == 2
    name, value = flags[0].partition("=")[0], flags[-1].partition("=")[2] or flags[-1]
    kebab = name.replace("_", "-")
    assert capsys.readouterr().err == (
        f"cosmos-edge: error: act: {name}: expected True or False after it (or {kebab} / --no-{kebab[2:]}), got "
        f"{value!r} (see: cosmos-edge act --help)\n"
    )


def test_logging_shows_cosmos_edge_at_info_and_other_libraries_from_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    root, ours = logging.getLogger(), logging.getLogger("cosmos_edge")
    for logger in (root, ours):  # restored after the test, as pytest's own handlers
        monkeypatch.setattr(logger, "level", logger.level)
        monkeypatch.setattr(logger, "handlers", [])
    cli_main._configure_logging(verbose=False)
    assert (root.level, ours.level) == (logging.WARNING, logging.INFO) and root.handlers
    root.handlers = []
    cli_main._configure_logging(verbose=True)
    assert (root.level, ours.level) == (logging.DEBUG, logging.DEBUG)
    root.setLevel(logging.ERROR)
    cli_main._configure_logging(verbose=False)  # configured already (a host program): left as it is
    assert (root.level, ours.level) == (logging.ERROR, logging.DEBUG)
