"""`checkpoint random` → `checkpoint inspect` → `act`, in process, for every platform."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_image
from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy import text_embeddings
from cosmos_edge.runtime.policy.api import ActionQuery, Observation
from tests.helpers.bridge_doubles import free_port
from tests.helpers.observations import random_observation
from tests.helpers.policies import reference_policy

INSTRUCTION = "put the candy in the bag"  # one of the random ALOHA model's


def test_random_then_inspect_reports_the_dit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoint", "random", "--config", "tiny", "--platform", "libero", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["checkpoint", "inspect", "--json", str(tmp_path / "cosmos_policy_libero_tiny.pt")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["network"] == "dit" and report["format"] == "official" and report["problems"] == []
    assert report["config"]["model_channels"] == 64 and report["config"]["num_blocks"] == 2
    assert main(["checkpoint", "inspect", "--json", str(tmp_path / "tokenizer.pth")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["network"] == "wan2.1-vae" and report["config"]["base_dim"] == 8
    torch = pytest.importorskip("torch")
    state = torch.load(tmp_path / "tokenizer.pth", weights_only=True)
    del state["decoder.middle.0.residual.3.gamma"]
    state["foo.bar"] = torch.zeros(1)
    torch.save(state, tmp_path / "damaged.pth")
    assert main(["checkpoint", "inspect", "--json", str(tmp_path / "damaged.pth")]) == 1  # a report, as a DiT's
    report = json.loads(capsys.readouterr().out)
    assert report["path"] == str(tmp_path / "damaged.pth")
    assert report["problems"] == ["missing key decoder.middle.0.residual.3.gamma", "unexpected key foo.bar"]


def test_output_into_a_reader_that_is_gone_ends_quietly(tiny_assets: dict[str, CheckpointFiles]) -> None:
    # As `cosmos-edge checkpoint inspect FILE --json | head -1` once head has exited: no traceback.
    command = [sys.executable, "-m", "cosmos_edge.cli.main", "checkpoint", "inspect", "--json"]
    process = subprocess.Popen(
        [*command, str(tiny_assets["aloha"].tokenizer)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    errors = process.stderr.read().decode()
    assert process.wait() == 141 and "Traceback" not in errors and "BrokenPipe" not in errors, errors


def test_an_interrupted_random_model_leaves_nothing_that_blocks_a_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupt(*args: object) -> None:
        raise KeyboardInterrupt  # Ctrl-C while the last file is written, after the other three

    with monkeypatch.context() as patched:
        patched.setattr(text_embeddings, "write", interrupt)
        assert main(["checkpoint", "random", "--out", str(tmp_path)]) == 130
    assert list(tmp_path.iterdir()) == []
    assert main(["checkpoint", "random", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.iterdir())) == 4


def test_inspect_a_file_that_is_no_checkpoint_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a checkpoint")
    assert main(["checkpoint", "inspect", str(path)]) == 2
    assert "junk.pt" in capsys.readouterr().err


@pytest.mark.parametrize("platform", ["libero", "robocasa", "aloha"])
def test_act_runs_one_query(platform: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["checkpoint", "random", "--platform", platform, "--out", str(tmp_path)]) == 0
    observation = random_observation(platform)
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    task = (tmp_path / f"{platform}_t5_embeddings.safetensors").as_posix()

    instruction = text_embeddings.read(task).instructions[0]
    out = tmp_path / "result.npz"
    argv = ["act", "--checkpoint", str(tmp_path / f"cosmos_policy_{platform}_tiny.pt")]
    argv += [
        "--tokenizer",
        str(tmp_path / "tokenizer.pth"),
        "--stats",
        str(tmp_path / f"{platform}_dataset_statistics.json"),
    ]
    argv += ["--text-embeddings", task, "--platform", platform, "--observation", str(tmp_path / "obs.npz")]
    argv += ["--task", instruction, "--seed", "195", "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "action chunk" in printed and "value" in printed and "vae_encode" in printed
    with np.load(out) as result:
        assert result["actions"].dtype == np.float32 and result["actions"].ndim == 2
        assert result["value"].shape == () and 0.0 <= float(result["value"]) <= 1.0
        assert result["future_proprio"].ndim == 1
        flagged = result["actions"]
    if platform == "aloha":  # the file as OBSERVATION, as `client act` takes it too: the same query
        positional = [*[arg for arg in argv if arg != "--observation"][:-1], str(tmp_path / "again.npz")]
        assert main(positional) == 0
        with np.load(tmp_path / "again.npz") as result:
            np.testing.assert_array_equal(result["actions"], flagged)
        assert main([*positional, "--observation", str(tmp_path / "obs.npz")]) == 2  # given twice
        assert "give the observation .npz once, as OBSERVATION or --observation" in capsys.readouterr().err


@pytest.mark.slow
def test_a_compiled_act_says_that_its_query_compiles_first(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # On CUDA `act` compiles by default: a minute or more of silence for the 2B model, and in its stage timings.
    assert main(["checkpoint", "random", "--platform", "aloha", "--out", str(tmp_path)]) == 0
    observation = random_observation("aloha")
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    task = tmp_path / "aloha_t5_embeddings.safetensors"
    argv = ["act", "--checkpoint", str(tmp_path / "cosmos_policy_aloha_tiny.pt"), "--tokenizer"]
    argv += [str(tmp_path / "tokenizer.pth"), "--stats", str(tmp_path / "aloha_dataset_statistics.json")]
    argv += ["--text-embeddings", str(task), "--platform", "aloha", "--observation", str(tmp_path / "obs.npz")]
    argv += ["--task", text_embeddings.read(task).instructions[0], "--steps", "1"]
    announcement = "this query compiles the networks first"
    with caplog.at_level(logging.INFO, logger="cosmos_edge"):
        assert main(argv) == 0  # the CPU's default: eager
        assert announcement not in caplog.text
        assert main([*argv, "--compile", "--compile-scope", "blocks"]) == 0
    assert announcement in caplog.text


def test_act_resizes_aloha_frames_as_the_official_client_does(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The official ALOHA server sees the client's 224x224 images (480x640 -> 256 -> 224), never the camera's frames.
    files = tiny_assets["aloha"]
    observation = random_observation("aloha", height=240, width=320)
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    argv = ["act", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer), "--stats"]
    argv += [str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--observation", str(tmp_path / "obs.npz"), "--task", INSTRUCTION, "--steps", "1"]
    with caplog.at_level(logging.INFO, logger="cosmos_edge.cli"):
        assert main([*argv, "--out", str(tmp_path / "result.npz")]) == 0
    assert "resizing cam_left_wrist 240x320, cam_right_wrist 240x320, cam_high 240x320 to 224x224" in caplog.text
    frames = {camera: aloha_wire_image(camera, frame) for camera, frame in observation.images.items()}
    wire = Observation(frames, observation.proprio)
    policy = reference_policy(files, encode_full_sequence=False)
    expected = policy.infer(ActionQuery(wire, INSTRUCTION, steps=1))
    with np.load(tmp_path / "result.npz") as result:
        np.testing.assert_array_equal(result["actions"], expected.actions)


def test_act_samples_with_the_official_variance_scale_when_asked(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    files = tiny_assets["aloha"]
    observation = random_observation("aloha", seed=9, height=224, width=224)  # as the official client sends them
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    argv = ["act", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer), "--stats"]
    argv += [str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--observation", str(tmp_path / "obs.npz"), "--task", INSTRUCTION, "--steps", "3", "--seed", "7"]
    assert main([*argv, "--use-variance-scale", "--out", str(tmp_path / "scaled.npz")]) == 0
    assert main([*argv, "--out", str(tmp_path / "plain.npz")]) == 0
    query = ActionQuery(observation, INSTRUCTION, seed=7, steps=3)
    with load_policies(CheckpointSource(files), use_variance_scale=True) as loaded:
        expected = loaded.reactive.infer(query)
    with np.load(tmp_path / "scaled.npz") as scaled, np.load(tmp_path / "plain.npz") as plain:
        np.testing.assert_array_equal(scaled["actions"], expected.actions)
        assert np.abs(scaled["actions"] - plain["actions"]).max() > 1e-3


def test_a_network_returning_nan_fails_the_run_not_the_request(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip("torch")
    files = tiny_assets["aloha"]
    state = torch.load(files.checkpoint, weights_only=True)
    state["net.final_layer.linear.weight"].fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    observation = random_observation("aloha", height=224, width=224)
    np.savez(tmp_path / "obs.npz", proprio=observation.proprio, **observation.images)
    argv = ["act", "--checkpoint", str(tmp_path / "nan.pt"), "--tokenizer", str(files.tokenizer), "--stats"]
    argv += [str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--observation", str(tmp_path / "obs.npz"), "--task", INSTRUCTION, "--steps", "1"]
    assert main(argv) == 1  # a failure of what ran (exit 1), not of what was asked (exit 2)
    error = capsys.readouterr().err
    assert "network output: NaN or infinity in the action chunk" in error and "Traceback" not in error
    named = (
        f"--checkpoint {tmp_path / 'nan.pt'}, --tokenizer {files.tokenizer}, --text-embeddings {files.text_embeddings}"
    )
    assert f"the model: {named}" in error
    serve = ["serve", *argv[1:11], "--endpoint", f"tcp://127.0.0.1:{free_port()}"]
    assert main(serve) == 1  # its warm-up query finds it, before serving
    assert "warm-up: network output: NaN or infinity in the action chunk" in (error := capsys.readouterr().err)
    assert f"the model: {named}" in error
    assert main(["checkpoint", "inspect", str(tmp_path / "nan.pt")]) == 1  # found a problem
    assert "NaN or infinity in net.final_layer.linear.weight" in capsys.readouterr().out


def test_upright_frames_give_what_the_same_frames_as_rendered_give(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The official quickstart's sample observation holds upright frames, which its get_action takes as they are.
    files = tiny_assets["libero"]
    rendered = random_observation("libero")
    upright = {camera: frame[::-1] for camera, frame in rendered.images.items()}
    np.savez(tmp_path / "rendered.npz", proprio=rendered.proprio, **rendered.images)
    np.savez(tmp_path / "upright.npz", proprio=rendered.proprio, **upright)
    argv = ["act", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer), "--stats"]
    argv += [str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "libero"]
    argv += ["--task", text_embeddings.read(files.text_embeddings).instructions[0], "--steps", "1"]
    for name, extra in (("rendered", []), ("upright", ["--frames", "upright"]), ("twice", [])):
        observation = tmp_path / ("rendered.npz" if name == "rendered" else "upright.npz")
        assert main([*argv, "--observation", str(observation), "--out", str(tmp_path / f"out_{name}.npz"), *extra]) == 0
    results = {name: np.load(tmp_path / f"out_{name}.npz")["actions"] for name in ("rendered", "upright", "twice")}
    np.testing.assert_array_equal(results["upright"], results["rendered"])
    assert not np.array_equal(results["twice"], results["rendered"])  # upright frames taken as rendered: flipped twice
    aloha = tiny_assets["aloha"]
    argv = ["act", "--checkpoint", str(aloha.checkpoint), "--tokenizer", str(aloha.tokenizer), "--stats"]
    argv += [str(aloha.stats), "--text-embeddings", str(aloha.text_embeddings), "--platform", "aloha", "--task", "x"]
    observation = random_observation("aloha")
    np.savez(tmp_path / "aloha.npz", proprio=observation.proprio, **observation.images)
    capsys.readouterr()
    assert main([*argv, "--observation", str(tmp_path / "aloha.npz"), "--frames", "upright"]) == 2
    assert "--frames upright: aloha frames are never flipped; drop the flag" in capsys.readouterr().err
