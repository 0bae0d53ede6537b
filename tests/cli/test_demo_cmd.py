"""The README's main job, shortened to one chunk: model written, served, executed in gym-aloha, reported."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

from cosmos_edge.cli import demo_cmd
from cosmos_edge.cli.main import main
from cosmos_edge.runtime.errors import ConfigError

pytest.importorskip("gym_aloha", reason="the demo needs the `sim` extra (gym-aloha)")


@pytest.mark.slow
def test_demo_runs_one_chunk(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--chunks", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed
    assert "round trip (wall clock)" in printed and "vae_encode" in printed
    assert "safety interventions: commands=50" in printed
    assert "chunks_adopted=0" not in printed
    assert re.search(r"simulation \(transfer_cube\): last reward \S+, task solved: (yes|no)\n", printed)
    strip = Image.open(tmp_path / "episode.png")
    assert strip.size == (160 * 2, 120)  # cam_high every 25 of the 50 ticks
    assert (tmp_path / "model" / "tokenizer.pth").is_file()


def test_a_directory_of_a_demo_before_the_mark_is_still_the_demos(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("cosmos_policy_aloha_tiny.pt", "tokenizer.pth"):
        (model / name).write_bytes(b"an earlier demo's")
    (tmp_path / "episode.png").write_bytes(b"an earlier demo's")
    demo_cmd._claim_out_directory(tmp_path, model)
    assert (tmp_path / demo_cmd.OWN_DIRECTORY_MARK).is_file()
    # A mark that predates the list of files (a plain text line) is still an earlier demo's.
    (tmp_path / demo_cmd.OWN_DIRECTORY_MARK).write_text("written by cosmos-edge demo\n")
    demo_cmd._claim_out_directory(tmp_path, model)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / demo_cmd.OWN_DIRECTORY_MARK).unlink()
    with pytest.raises(ConfigError, match="holds files the demo did not write"):
        demo_cmd._claim_out_directory(tmp_path, model)


def test_a_file_put_over_one_the_demo_wrote_is_not_replaced(tmp_path: Path) -> None:
    model = tmp_path / "model"
    demo_cmd._claim_out_directory(tmp_path, model)  # a new directory: the demo's
    model.mkdir()
    (model / "tokenizer.pth").write_bytes(b"the demo's random VAE")
    (tmp_path / "episode.png").write_bytes(b"the demo's strip")
    demo_cmd._record_demo_files(tmp_path)  # as the demo does after writing them
    demo_cmd._claim_out_directory(tmp_path, model)  # a later demo may replace them
    (model / "tokenizer.pth").write_bytes(b"the real tokenizer")  # put there since
    with pytest.raises(ConfigError, match=r"or that changed since it did \(model/tokenizer.pth\)"):
        demo_cmd._claim_out_directory(tmp_path, model)
    (model / "tokenizer.pth").write_bytes(b"the demo's random VAE")
    (model / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"or that changed since it did \(model/notes.txt\)"):
        demo_cmd._claim_out_directory(tmp_path, model)


def test_the_demo_never_replaces_files_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = tmp_path / "model" / "tokenizer.pth"
    real.parent.mkdir()
    real.write_text("the real tokenizer")
    assert main(["demo", "--chunks", "1", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path}: holds files the demo did not write" in capsys.readouterr().err
    assert real.read_text() == "the real tokenizer"
