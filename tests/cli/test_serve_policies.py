"""`serve` builds a reactive and a planning policy from checkpoint files, both answering the same query."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli import serve_cmd
from cosmos_edge.cli.planning_args import no_planning
from cosmos_edge.runtime.bundle.sources import BundleSource
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.api import ActionQuery
from tests.helpers.observations import random_observation


def test_serve_parser_builds_both_modes(
    tiny_assets: dict[str, CheckpointFiles], caplog: pytest.LogCaptureFixture
) -> None:
    files = tiny_assets["libero"]
    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    files_args = [
        "--checkpoint",
        str(files.checkpoint),
        "--tokenizer",
        str(files.tokenizer),
        "--stats",
        str(files.stats),
    ]
    files_args += ["--text-embeddings", str(files.text_embeddings), "--platform", "libero"]
    args = parser.parse_args(
        ["serve", *files_args, "--num-candidates", "2", "--precision", "fp32", "--devices", "cpu,cpu"]
    )
    with caplog.at_level(logging.WARNING, logger="cosmos_edge.cli.serve_cmd"):
        policies = serve_cmd.served_policies(args).modes()
    assert "--devices cpu,cpu: cpu given more than once; each entry loads its own DiT" in caplog.text
    assert set(policies) == {"reactive", "planning"}
    query = ActionQuery(random_observation("libero"), policies["reactive"].instructions[0], seed=1, steps=1)
    reactive, planned = policies["reactive"].infer(query), policies["planning"].infer(query)
    assert reactive.actions.shape == planned.actions.shape == (16, 7)
    assert np.isfinite(planned.actions).all() and 0.0 <= planned.value <= 1.0


def parse_serve(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_cmd.register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_from_a_bundle_builds_both_modes(tiny_bundles: Callable[..., Path]) -> None:
    args = parse_serve(["--bundle", str(tiny_bundles("libero")), "--num-candidates", "2"])
    policies = serve_cmd.served_policies(args).modes()
    query = ActionQuery(random_observation("libero"), policies["reactive"].instructions[0], seed=1, steps=1)
    assert policies["reactive"].infer(query).actions.shape == (16, 7)
    planned = policies["planning"].infer(query)
    assert planned.actions.shape == (16, 7) and 0.0 <= planned.value <= 1.0


def test_serve_refuses_mixed_or_missing_sources(tiny_bundles: Callable[..., Path]) -> None:
    bundle = str(tiny_bundles("libero"))
    for mixed in (["--checkpoint", "x.pt"], ["--planning-checkpoint", "x.pt"]):
        with pytest.raises(ConfigError, match=f"--bundle: runs on .* got \\['{mixed[0]}'\\]"):
            serve_cmd.served_policies(parse_serve(["--bundle", bundle, *mixed]))
    with pytest.raises(ConfigError, match="--checkpoint"):
        serve_cmd.served_policies(parse_serve(["--platform", "libero"]))


@pytest.fixture
def reactive_only_bundle(tiny_bundles: Callable[..., Path]) -> Path:
    """An ALOHA bundle of DiT batch size 1 alone (as `export`'s default --batch-sizes 1): it serves no best-of-N on one
    device without a planning deadline."""
    return tiny_bundles("aloha", batch_sizes=(1,))


@pytest.fixture
def loading_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `serve` that gets as far as loading its models fails the test: these settings must be refused first."""

    def load(*_: object, **__: object) -> None:
        raise AssertionError("the models were loaded before the settings were refused")

    monkeypatch.setattr(serve_cmd, "load_policies", load)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--default-mode", "planning"], "--default-mode planning: bundle .* has DiT batch sizes \\[1\\], which fit"),
        (["--search-depth", "3"], "--search-depth: a planning option, but bundle .* has DiT batch sizes \\[1\\]"),
        (["--http", "127.0.0.1:0", "--devices", "cpu,,cpu"], "--devices 'cpu,,cpu': expected comma-separated"),
    ],
)
@pytest.mark.usefixtures("loading_refused")
def test_serve_refuses_what_a_bundle_cannot_serve_before_loading(
    reactive_only_bundle: Path, argv: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        serve_cmd.served_policies(parse_serve(["--bundle", str(reactive_only_bundle), *argv]))


@pytest.mark.usefixtures("loading_refused")
def test_serve_refuses_the_official_endpoint_for_other_cameras_before_loading(
    tiny_assets: dict[str, CheckpointFiles],
) -> None:
    files = tiny_assets["libero"]
    argv = ["--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer), "--stats", str(files.stats)]
    argv += ["--text-embeddings", str(files.text_embeddings), "--platform", "libero", "--http", "127.0.0.1:0"]
    with pytest.raises(
        ConfigError, match=r"http: the official /act format carries ALOHA.s cameras .* platform 'libero' has"
    ):
        serve_cmd.served_policies(parse_serve(argv))


def test_a_planning_deadline_plans_on_a_bundle_of_batch_size_one(reactive_only_bundle: Path) -> None:
    # Under a deadline candidates are scored one at a time: batch 1, which every bundle has.
    one_step = ["--num-denoising-steps-action", "1", "--num-denoising-steps-future-state", "1"]
    one_step += ["--num-denoising-steps-value", "1", "--no-use-ensemble-value-predictions"]
    one_step += ["--no-use-ensemble-future-state-predictions"]
    args = parse_serve(["--bundle", str(reactive_only_bundle), "--planning-deadline-ms", "60000", *one_step])
    with serve_cmd.served_policies(args) as loaded:
        assert loaded.planning is not None and loaded.planning.config.num_queries_best_of_n == 8  # the preset's
        query = ActionQuery(random_observation("aloha"), loaded.reactive.instructions[0], seed=1)
        planned = loaded.planning.infer(query)
        assert planned.candidates is not None and planned.candidates.outcome == "complete"
        assert len(planned.candidates.values) == 8
        assert planned.actions.shape == (50, 14) and 0.0 <= planned.value <= 1.0


@pytest.mark.usefixtures("loading_refused")
def test_the_reactive_only_reason_names_what_would_plan(reactive_only_bundle: Path) -> None:
    reason = no_planning(BundleSource(reactive_only_bundle), None, 8)
    assert "which fit no best of 2 to 8 candidates over 1 device(s); to plan, give --planning-deadline-ms" in reason
    assert "--num-candidates" not in reason  # no number of candidates fits batch size 1 alone


def test_a_bad_device_is_the_error_seen_before_the_reactive_only_warning(
    reactive_only_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad_device = parse_serve(["--bundle", str(reactive_only_bundle), "--devices", "gpu"])
    refused = pytest.raises(ConfigError, match=r"^--devices: .*'gpu'")
    with caplog.at_level(logging.WARNING), refused, serve_cmd.naming_flags(serve_cmd._FLAGS):
        serve_cmd.served_policies(bad_device)
    assert "serving the reactive mode only" not in caplog.text
    with caplog.at_level(logging.WARNING):
        serve_cmd.served_policies(parse_serve(["--bundle", str(reactive_only_bundle)])).close()
    assert "serving the reactive mode only" in caplog.text
