"""`cosmos-edge export` then `act --bundle`: the bundle's chunk is the reference `act` chunk."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cosmos_edge.cli import export_cmd
from cosmos_edge.cli.main import main
from cosmos_edge.export import bundle_writer
from cosmos_edge.runtime.bundle import manifest
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import text_embeddings
from cosmos_edge.runtime.policy.normalization import DatasetStats
from tests.helpers.observations import random_observation


def export(argv: list[str]) -> int:
    """`cosmos-edge export ARGV` through its own parser, independent of the wiring in cli/main.py."""
    parser = argparse.ArgumentParser()
    export_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["export", *argv])
    return int(args.func(args))


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[object]:
    """Records the first argument of every call of `owner.name` from now on."""
    calls: list[object] = []
    original = getattr(owner, name)

    def counted(first: object, *args: object, **kwargs: object) -> object:
        calls.append(first)
        return original(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def official_args(files: CheckpointFiles) -> list[str]:
    return [
        "--checkpoint",
        str(files.checkpoint),
        "--tokenizer",
        str(files.tokenizer),
        "--stats",
        str(files.stats),
        "--text-embeddings",
        str(files.text_embeddings),
        "--platform",
        files.platform,
    ]


def test_export_then_act_matches_the_reference_act(
    tiny_assets: dict[str, CheckpointFiles],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = tiny_assets["libero"]
    bundle = tmp_path / "bundle"
    argv = [*official_args(files), "--out", str(bundle), "--precision", "fp32", "--batch-sizes", "1,3"]
    planning = shutil.copyfile(files.checkpoint, tmp_path / "planning.pt")  # another file: exported on its own
    argv += ["--no-future-images", "--planning-checkpoint", str(planning)]
    assert export(argv) == 0
    printed = capsys.readouterr().out
    assert "libero, fp32" in printed and "planning_dit_b3" in printed
    assert sorted(Bundle.open(bundle).manifest.graphs) == [
        "dit_b1",
        "dit_b3",
        "dit_text_kv",
        "planning_dit_b1",
        "planning_dit_b3",
        "planning_dit_text_kv",
        "vae_encoder_cameras",
    ]

    observation = random_observation("libero", seed=3)
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    task = text_embeddings.read(files.text_embeddings).instructions[1]
    common = ["--observation", str(tmp_path / "obs.npz"), "--task", task, "--seed", "7", "--steps", "1"]
    assert main(["act", *official_args(files), *common, "--out", str(tmp_path / "reference.npz")]) == 0
    argv = ["act", "--bundle", str(bundle), "--backend", "onnxruntime", *common, "--out", str(tmp_path / "bundle.npz")]
    opened, hashed = count_calls(monkeypatch, Bundle, "open"), count_calls(monkeypatch, manifest, "sha256_file")
    assert main(argv) == 0
    # One command opens its bundle once and hashes each file once (a 2B bundle holds gigabytes).
    assert len(opened) == 1 and len(hashed) == len(set(hashed)) > 0, (opened, hashed)
    stats = DatasetStats.from_json(files.stats, platform_spec("libero"))
    span = stats.actions_max - stats.actions_min
    with np.load(tmp_path / "reference.npz") as reference, np.load(tmp_path / "bundle.npz") as served:
        assert served["actions"].shape == reference["actions"].shape
        # Normalised units; fp32 bundles measured within 3e-7 of the reference.
        assert np.abs(2 * (served["actions"] - reference["actions"]) / span).max() <= 1e-5
        assert abs(float(served["value"]) - float(reference["value"])) <= 1e-5
    capsys.readouterr()
    unknown = [*argv[:5], "--observation", str(tmp_path / "obs.npz"), "--task", "fold the towel"]
    assert main(unknown) == 2  # a bundle's store is hashed into it: a new instruction means exporting again
    assert "A bundle holds the instructions it was exported with" in capsys.readouterr().err
    assert main([*argv[:-2], "--device", "banana"]) == 2  # checked by the backend as it loads: named as the flag
    assert "cosmos-edge: error: --device: expected 'cpu', 'cuda[:N]' or 'tensorrt[:N]'" in capsys.readouterr().err
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # a usage error, named before any graph loads
        assert main([*argv[:-2], "--device", "cuda"]) == 2
        assert (
            "cosmos-edge: error: --device: 'cuda:0' needs onnxruntime's CUDAExecutionProvider"
            in capsys.readouterr().err
        )


def test_sigterm_during_export_leaves_nothing_and_says_so(
    tiny_assets: dict[str, CheckpointFiles],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def terminated(*args: object) -> None:  # as a supervisor stopping the job mid-export
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)  # the handler runs at the next bytecode, well within this

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", terminated)
    argv = ["export", *official_args(tiny_assets["libero"]), "--out", str(tmp_path / "bundle"), "--for", "cpu"]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "cosmos-edge: interrupted (export)"
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--checkpoint", "x.pt"], "--bundle: runs on --backend onnxruntime or tensorrt without the official files"),
        (["--backend", "torch"], "--bundle: runs on --backend onnxruntime or tensorrt"),
        (["--precision", "fp16"], "got ['--precision']"),
        (["--no-compile"], "got ['--no-compile']"),
        (["--compile-scope", "blocks"], "got ['--compile-scope']"),
        (["--no-cuda-graphs"], "got ['--no-cuda-graphs']"),
    ],
)
def test_act_refuses_a_bundle_mixed_with_the_torch_reference(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["act", "--bundle", str(tmp_path), "--observation", str(proprio_only(tmp_path)), "--task", "t", *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def proprio_only(directory: Path) -> Path:
    """An observation file that reads (the sources are checked after it)."""
    np.savez(directory / "obs.npz", proprio=np.zeros(14, np.float32))
    return directory / "obs.npz"


def test_act_without_bundle_or_files_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["act", "--observation", str(proprio_only(tmp_path)), "--task", "t"]) == 2
    assert "missing ['--checkpoint', '--tokenizer', '--stats', '--text-embeddings', '--platform']" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(("text", "expected"), [("1", (1,)), ("1,8", (1, 8)), ("8,1", (1, 8))])
def test_batch_sizes_parse(text: str, expected: tuple[int, ...]) -> None:
    assert export_cmd.batch_sizes(text) == expected


@pytest.mark.parametrize("text", ["", "0", "1,1", "one", "1,-2", "2,8", "1,65"])
def test_bad_batch_sizes_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected"):
        export_cmd.batch_sizes(text)
