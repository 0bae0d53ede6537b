"""`serve` builds a reactive and a planning policy from checkpoint files, both answering the same query."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli import serve_cmd
from cosmos_edge.runtime.bundle.sources import CheckpointFiles
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import ActionQuery
from tests.helpers.observations import random_observation


def test_serve_parser_builds_both_modes(tiny_assets: dict[str, CheckpointFiles]) -> None:
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
    policies = serve_cmd._policies(args).modes()
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
    policies = serve_cmd._policies(args).modes()
    query = ActionQuery(random_observation("libero"), policies["reactive"].instructions[0], seed=1, steps=1)
    assert policies["reactive"].infer(query).actions.shape == (16, 7)
    planned = policies["planning"].infer(query)
    assert planned.actions.shape == (16, 7) and 0.0 <= planned.value <= 1.0


def test_serve_refuses_mixed_or_missing_sources(tiny_bundles: Callable[..., Path]) -> None:
    bundle = str(tiny_bundles("libero"))
    for mixed in (["--checkpoint", "x.pt"], ["--planning-checkpoint", "x.pt"]):
        with pytest.raises(ConfigError, match=f"--bundle: runs on .* got \\['{mixed[0]}'\\]"):
            serve_cmd._policies(parse_serve(["--bundle", bundle, *mixed]))
    with pytest.raises(ConfigError, match="--checkpoint"):
        serve_cmd._policies(parse_serve(["--platform", "libero"]))
