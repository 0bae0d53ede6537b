"""`cosmos-edge client` against running stub servers, and `cosmos-edge keys generate` with a CURVE server."""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli.main import main
from cosmos_edge.cli.serve_cmd import add_serve_parser, server_config
from cosmos_edge.robot_bridge.binding import ServerConfig
from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_image
from cosmos_edge.robot_bridge.server import PolicyServer
from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import CheckpointSource
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.api import ActionQuery
from tests.helpers.bridge_doubles import (
    CUT_SHORT_CANDIDATES,
    INSTRUCTION,
    StubPolicy,
    expected_actions,
    free_port,
    observation,
    serving,
)
from tests.helpers.observations import random_observation

TIMEOUT_S = 5.0


def stub_server() -> PolicyServer:
    return PolicyServer(
        {"reactive": StubPolicy(), "planning": StubPolicy(offset=1.0, candidates=CUT_SHORT_CANDIDATES)},
        ServerConfig("tcp://127.0.0.1:*"),
    )


def test_set_mode_switches_a_running_server(capsys: pytest.CaptureFixture[str]) -> None:
    with serving(stub_server()) as endpoint:
        assert main(["client", "set-mode", "planning", "--endpoint", endpoint]) == 0
        assert capsys.readouterr().out == "mode: planning (was reactive)\n"
        with PolicyClient(endpoint, timeout_s=TIMEOUT_S) as client:
            assert client.metadata().mode == "planning"
        assert main(["client", "set-mode", "dreaming", "--endpoint", endpoint]) == 2
    error = capsys.readouterr().err
    assert error.startswith(
        "cosmos-edge: error: mode 'dreaming': the server refused it (unknown_mode): expected one of"
    )
    assert error.count("\n") == 1
    assert main(["client", "set-mode", "", "--endpoint", endpoint]) == 2  # refused before anything is sent
    assert capsys.readouterr().err.startswith("cosmos-edge: error: mode '': expected 1..64 characters")


def test_act_names_the_flag_or_the_file_that_gave_a_refused_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obs = observation(3.0)
    np.savez(tmp_path / "obs.npz", proprio=obs.proprio, **obs.images)  # type: ignore[arg-type]
    np.savez(tmp_path / "short.npz", proprio=obs.proprio[:13], **obs.images)  # type: ignore[arg-type]
    with serving(stub_server()) as endpoint:
        act = ["client", "act", "--task", INSTRUCTION, "--endpoint", endpoint]
        assert main([*act, str(tmp_path / "obs.npz"), "--mode", "dreaming"]) == 2
        assert capsys.readouterr().err.startswith("cosmos-edge: error: --mode: the server refused it (unknown_mode)")
        assert main([*act, str(tmp_path / "obs.npz"), "--frames", "upright"]) == 2
        assert (
            capsys.readouterr().err
            == "cosmos-edge: error: --frames upright: aloha frames are never flipped; drop the flag\n"
        )
        assert main([*act, str(tmp_path / "short.npz")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"cosmos-edge: error: observation: {tmp_path / 'short.npz'}: proprio: the server refused")
    assert error.count("\n") == 1


def test_a_task_the_server_has_no_embedding_for_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obs = observation(3.0)
    np.savez(tmp_path / "obs.npz", proprio=obs.proprio, **obs.images)  # type: ignore[arg-type]
    with serving(stub_server()) as endpoint:
        act = ["client", "act", str(tmp_path / "obs.npz"), "--task", "juggle", "--endpoint", endpoint]
        assert main(act) == 2
    error = capsys.readouterr().err
    assert error.startswith("cosmos-edge: error: --task: the server refused it (invalid_input): ")
    assert "'juggle'" in error and error.count("\n") == 1


def test_ping_metadata_and_act(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    obs = observation(3.0)
    np.savez(tmp_path / "obs.npz", proprio=obs.proprio, **obs.images)  # type: ignore[arg-type]
    out = tmp_path / "result.npz"
    with serving(stub_server()) as endpoint:
        assert main(["client", "ping", "--endpoint", endpoint]) == 0
        assert capsys.readouterr().out.startswith(f"pong from {endpoint}: server ")
        assert main(["client", "metadata", "--endpoint", endpoint]) == 0
        metadata = json.loads(capsys.readouterr().out)
        assert (metadata["platform"], metadata["modes"], metadata["instructions"]) == (
            "aloha",
            ["reactive", "planning"],
            [INSTRUCTION],
        )
        act = ["client", "act", str(tmp_path / "obs.npz"), "--task", INSTRUCTION, "--endpoint", endpoint]
        planning = [*act, "--mode", "planning", "--seed", "7", "--return-all-query-results"]
        reactive_out = ["--out", str(tmp_path / "reactive.npz")]
        assert main([*act, "--return-all-query-results", *reactive_out]) == 0  # no candidates in reactive mode: said
        assert "--return-all-query-results: the server answered in reactive mode" in caplog.text
        assert main(planning) == 2  # the candidates would be written nowhere
        assert "--return-all-query-results: every candidate's results are written to the --out file" in (
            capsys.readouterr().err
        )
        assert main([*planning, "--out", str(out.with_suffix(""))]) == 0  # np.savez adds .npz, and we say so
        printed = capsys.readouterr().out
        as_act_names_it = ["client", "act", "--observation", str(tmp_path / "obs.npz"), *act[3:]]
        assert main(as_act_names_it) == 0
        assert main([*as_act_names_it, str(tmp_path / "obs.npz")]) == 2  # given twice
        assert "give the observation .npz once, as OBSERVATION or --observation" in capsys.readouterr().err
    assert f"wrote {out}\n" in printed
    assert "action chunk: 50 x 14 (float32, un-normalised), mode planning" in printed
    assert "planning:     best_so_far, chose 1; values 0.500000, 0.750000, not scored" in printed
    with np.load(out) as result:
        np.testing.assert_allclose(result["actions"], expected_actions(obs.proprio, seed=7, offset=1.0))
        assert float(result["value"]) == 0.25
        assert str(result["planning_outcome"]) == "best_so_far" and int(result["chosen_index"]) == 1
        np.testing.assert_array_equal(result["candidate_values"], CUT_SHORT_CANDIDATES.values)  # NaN: not scored
        assert result["candidate_actions"].shape == (3, 50, 14) and result["candidate_values_by_depth"].shape == (3, 2)
        np.testing.assert_array_equal(result["candidate_actions_by_depth"][1], CUT_SHORT_CANDIDATES.actions_by_depth[1])
        # As `act` writes them: float64 values, NaN chunks for the candidate not sampled before the deadline.
        assert result["candidate_values"].dtype == np.float64
        np.testing.assert_array_equal(result["candidate_actions"], CUT_SHORT_CANDIDATES.actions)
        np.testing.assert_array_equal(result["candidate_actions_by_depth"], CUT_SHORT_CANDIDATES.actions_by_depth)


def test_keys_generate_then_a_curve_server_admits_the_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", str(tmp_path / "server"), "--name", "server"]) == 0
    assert main(["keys", "generate", str(tmp_path / "clients"), "--name", "robot"]) == 0
    assert "secret key: " in capsys.readouterr().out
    secret = tmp_path / "clients" / "robot.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "clients").stat().st_mode) == 0o777 & ~umask  # a service may read its .key files
    assert main(["keys", "generate", str(tmp_path / "clients"), "--name", "robot"]) == 2  # never overwritten
    assert "robot.key: already exists" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), make_policies=lambda args: {})
    server_secret, clients = tmp_path / "server" / "server.key_secret", tmp_path / "clients"
    serve_args = ["--endpoint", "tcp://127.0.0.1:*", "--curve-secret-key", str(server_secret)]
    config = server_config(parser.parse_args(["serve", *serve_args, "--curve-clients", str(clients)]))
    keys = ["--curve-server-key", str(tmp_path / "server" / "server.key"), "--curve-secret-key", str(secret)]
    with serving(PolicyServer(StubPolicy(), config)) as endpoint:
        assert main(["client", "set-mode", "reactive", "--endpoint", endpoint, *keys]) == 0
        assert capsys.readouterr().out == "mode: reactive (was reactive)\n"
        assert main(["client", "ping", "--endpoint", endpoint, "--timeout", "0.5"]) == 1  # no keys: no handshake
        assert "no connection to" in capsys.readouterr().err
        # The server's secret where its public key belongs: refused, so that it is not copied onto the robot.
        leaked = ["--curve-server-key", str(server_secret), "--curve-secret-key", str(secret)]
        assert main(["client", "ping", "--endpoint", endpoint, *leaked]) == 2
        assert f"{server_secret}: holds a secret key; give the public '.key' file" in capsys.readouterr().err


def test_option_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        ("--curve-server-key", str(tmp_path / "server.key")): "give both or neither",
        (
            "--curve-server-key",
            str(tmp_path / "a.key"),
            "--curve-secret-key",
            str(tmp_path / "b"),
        ): "a.key: no such file",
        ("--timeout", "0"): "--timeout: expected a finite number in (0, 86400]",
        ("--endpoint", "inproc://policy"): "--endpoint inproc://policy: reaches only its own process",
        ("--endpoint", "tcp://no-such-host.invalid:5555"): "cannot resolve 'no-such-host.invalid'",
    }
    no_server = ("--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.2")
    failures = {  # nothing wrong with what was given: exit code 1
        no_server: (
            "within 0.2 s (sending a ping request); is the server running, and is this its ZeroMQ endpoint (not its "
            "HTTP port), or does it require CURVE keys (the server's public key and a client key pair)? (--timeout "
            "sets how long this command waits)"
        ),
    }
    for expected_code, expected in ((2, cases), (1, failures)):
        for options, message in expected.items():
            assert main(["client", "ping", *options]) == expected_code, options
            error = capsys.readouterr().err
            assert error.startswith("cosmos-edge: error: ") and message in error and error.count("\n") == 1, error
    assert main(["keys", "generate", str(tmp_path), "--name", "../x"]) == 2
    assert "--name: expected a plain file name" in capsys.readouterr().err
    (tmp_path / "a_file").touch()
    assert main(["keys", "generate", str(tmp_path / "a_file")]) == 2
    assert f"DIR {tmp_path / 'a_file'}: is a file; expected the directory" in capsys.readouterr().err
    assert main(["keys", "generate", str(tmp_path / "a_file" / "below")]) == 2
    error = capsys.readouterr().err
    assert "cannot write the key pair (" in error and "Errno" not in error


def test_act_resizes_camera_frames_to_the_wire_size_as_the_controller_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cosmos_edge.cli")
    obs = observation(3.0)
    rng = np.random.default_rng(5)
    frames = {camera: rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for camera in obs.images}
    frames["cam_left_wrist"] = obs.images["cam_left_wrist"]  # 224x224 already: sent as it is
    np.savez(tmp_path / "obs.npz", proprio=obs.proprio.astype(np.float64), **frames)  # type: ignore[arg-type]
    policy = StubPolicy()
    with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
        act = ["client", "act", str(tmp_path / "obs.npz"), "--task", INSTRUCTION, "--endpoint", endpoint]
        assert main(act) == 0, capsys.readouterr().err
    (query,) = policy.queries
    for camera, frame in frames.items():
        wire = frame if camera == "cam_left_wrist" else aloha_wire_image(camera, frame)
        np.testing.assert_array_equal(query.observation.images[camera], wire)
    resizing = [record.getMessage() for record in caplog.records if "resizing" in record.getMessage()]
    assert resizing == [
        "observation: resizing cam_right_wrist 480x640, cam_high 480x640 to 224x224, as the official ALOHA client does"
    ]


def test_act_refuses_a_bad_observation_file_in_one_line_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obs = observation()
    cases = {
        "text proprio": ({"proprio": np.array(["0.5"] * 14)}, "proprio: expected numbers, got dtype <U3"),
        "2-D proprio": ({"proprio": np.zeros((2, 14))}, "proprio: expected 1 dimension,"),
        "NaN proprio": ({"proprio": np.full(14, np.nan)}, "proprio: expected finite values"),
        "float image": ({"cam_high": np.zeros((480, 640, 3))}, "images['cam_high']: expected dtype uint8, got float64"),
        "grey image": (
            {"cam_high": np.zeros((480, 640), np.uint8)},
            "images['cam_high']: expected shape [H, W, 3] with H, W > 0, got [480, 640]",
        ),
    }
    for name, (changes, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **({"proprio": obs.proprio, **obs.images} | changes))  # type: ignore[arg-type]
        # Nobody at the endpoint: an observation that passed the checks would time out instead.
        assert main(["client", "act", str(path), "--task", INSTRUCTION, "--endpoint", "tcp://127.0.0.1:9"]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"cosmos-edge: error: observation: {path}: {message}"), (name, error)
        assert error.count("\n") == 1, (name, error)
    np.savez(tmp_path / "no_cameras.npz", proprio=obs.proprio)
    no_cameras = ["client", "act", str(tmp_path / "no_cameras.npz"), "--task", INSTRUCTION]
    assert main([*no_cameras, "--endpoint", "tcp://127.0.0.1:9"]) == 2
    assert "no_cameras.npz: no camera images; expected one uint8 HxWx3 array per camera" in capsys.readouterr().err
    np.savez(tmp_path / "good.npz", proprio=obs.proprio, **obs.images)  # type: ignore[arg-type]
    no_task = ["client", "act", str(tmp_path / "good.npz"), "--task", "", "--endpoint", "tcp://127.0.0.1:9"]
    assert main(no_task) == 2  # a request this command refuses to build, as the server would refuse it
    assert "cosmos-edge: error: --task: expected 1..1024 characters, got 0" in capsys.readouterr().err


def test_a_libero_server_takes_its_cameras_size_and_answers_what_act_computes(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # LIBERO renders 256x256: a client-side resize to 224 would not give the bits of the in-process preprocessing.
    files = tiny_assets["libero"]
    frames = random_observation("libero", seed=4, height=256, width=256)
    np.savez(tmp_path / "obs.npz", proprio=frames.proprio, **frames.images)
    with load_policies(CheckpointSource(files)) as loaded:
        policy = loaded.reactive
        task = policy.instructions[0]
        expected = policy.infer(ActionQuery(frames, task, seed=195, steps=1))
        act = ["client", "act", str(tmp_path / "obs.npz"), "--task", task, "--steps", "1", "--seed", "195"]
        with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
            assert main([*act, "--endpoint", endpoint]) == 2  # 224x224 by default: refused, naming the flag
        error = capsys.readouterr().err
        assert "obs.npz: " in error and "expected 224x224 frames" in error and "--image-size 256x256" in error
        aloha = random_observation("aloha", seed=4, height=256, width=256)
        np.savez(tmp_path / "aloha.npz", proprio=aloha.proprio, **aloha.images)
        with serving(PolicyServer(policy, ServerConfig("tcp://127.0.0.1:*"))) as endpoint:
            assert main(["client", "act", str(tmp_path / "aloha.npz"), "--task", task, "--endpoint", endpoint]) == 2
        error = capsys.readouterr().err  # the cameras, not their size, are what is wrong
        assert "aloha.npz: cameras ['cam_high'," in error and "this libero server takes" in error
        sized = ServerConfig("tcp://127.0.0.1:*", image_size=(256, 256))
        upright = {camera: frame[::-1] for camera, frame in frames.images.items()}  # as the official quickstart's
        np.savez(tmp_path / "upright.npz", proprio=frames.proprio, **upright)
        upright_act = [*act, "--frames", "upright", "--out", str(tmp_path / "upright_served.npz")]
        upright_act[2] = str(tmp_path / "upright.npz")
        with serving(PolicyServer(policy, sized)) as endpoint:
            assert main([*act, "--endpoint", endpoint, "--out", str(tmp_path / "served.npz")]) == 0
            assert main([*upright_act, "--endpoint", endpoint]) == 0
    for name in ("served.npz", "upright_served.npz"):
        with np.load(tmp_path / name) as served:
            np.testing.assert_array_equal(served["actions"], expected.actions)


def test_act_without_a_server_fails_in_the_control_timeout_not_the_acts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    obs = random_observation("aloha")
    np.savez(tmp_path / "good.npz", proprio=obs.proprio, **obs.images)  # type: ignore[arg-type]
    argv = ["client", "act", str(tmp_path / "good.npz"), "--task", INSTRUCTION, "--endpoint"]
    assert main([*argv, f"tcp://127.0.0.1:{free_port()}"]) == 1
    # The server's metadata first, within the 5 s of a control request, rather than the act's 120 s.
    assert "within 5.0 s (sending a metadata request); is the server running" in capsys.readouterr().err
