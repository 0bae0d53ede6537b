"""`serve` builds a reactive and a planning policy from checkpoint files, both answering the same query."""

from __future__ import annotations

import argparse

import numpy as np

from cosmos_edge.cli import serve_cmd
from cosmos_edge.runtime.policy_api import ActionQuery
from cosmos_edge.runtime.torch_backend import PolicyFiles
from tests.conftest import random_observation


def test_serve_parser_builds_both_modes(tiny_assets: dict[str, PolicyFiles]) -> None:
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
    policies = serve_cmd._torch_policies(args)
    assert set(policies) == {"reactive", "planning"}
    query = ActionQuery(random_observation("libero"), policies["reactive"].instructions[0], seed=1, steps=1)
    reactive, planned = policies["reactive"].infer(query), policies["planning"].infer(query)
    assert reactive.actions.shape == planned.actions.shape == (16, 7)
    assert np.isfinite(planned.actions).all() and 0.0 <= planned.value <= 1.0
