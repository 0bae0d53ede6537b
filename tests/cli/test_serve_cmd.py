"""`serve` arguments become a validated ServerConfig (and HttpConfig); the policy factory is the caller's."""

from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import pytest
import zmq.auth

from cosmos_edge.cli.main import main
from cosmos_edge.cli.serve_cmd import add_serve_parser, http_config, official_image_lists, server_config
from cosmos_edge.robot_bridge.client import PolicyClient
from cosmos_edge.robot_bridge.official_act import CAMERAS, CandidateImageLists
from cosmos_edge.robot_bridge.protocol import ActRequest
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.api import Policy
from cosmos_edge.runtime.policy.planning_config import planning_preset
from tests.helpers.bridge_doubles import (
    INSTRUCTION,
    STARTUP_S,
    free_port,
    observation,
    serve_stub,
    wait_until_serving,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), make_policies=lambda args: {})
    return parser.parse_args(["serve", *argv])


def test_defaults_bind_loopback() -> None:
    config = server_config(parse())
    assert config.endpoint == "tcp://127.0.0.1:5555"
    assert (config.default_mode, config.curve, config.insecure_bind_all) == ("reactive", None, False)
    assert config.limits.max_message_bytes == 16 * 2**20


def test_binding_all_interfaces_needs_curve_or_the_insecure_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="reachable from other machines"):
        server_config(parse("--endpoint", "tcp://0.0.0.0:5555"))
    assert server_config(parse("--endpoint", "tcp://0.0.0.0:5555", "--insecure-bind-all")).insecure_bind_all
    clients = tmp_path / "clients"
    clients.mkdir()
    _, server_secret = zmq.auth.create_certificates(tmp_path, "server")
    client_public, _ = zmq.auth.create_certificates(clients, "robot")
    config = server_config(
        parse("--endpoint", "tcp://*:5555", "--curve-secret-key", str(server_secret), "--curve-clients", str(clients))
    )
    assert config.curve is not None
    assert config.curve.allowed_clients == frozenset({zmq.auth.load_certificate(client_public)[0]})


def test_message_limits_are_checked_as_flags() -> None:
    small = server_config(parse("--max-message-mb", "0.1", "--max-array-mb", "0.05")).limits
    assert (small.max_message_bytes, small.max_array_bytes) == (round(0.1 * 2**20), round(0.05 * 2**20))
    assert small.max_header_bytes == small.max_message_bytes  # the header fits in the message, whatever its size
    with pytest.raises(ConfigError, match=r"^--max-array-mb 5: expected at most --max-message-mb \(1\); lower it too$"):
        server_config(parse("--max-message-mb", "1", "--max-array-mb", "5"))


def test_the_frame_size_is_a_flag_and_an_aloha_server_takes_only_the_official_clients(
    tiny_assets: dict[str, CheckpointFiles], capsys: pytest.CaptureFixture[str]
) -> None:
    assert server_config(parse()).image_size == (224, 224)
    assert server_config(parse("--image-size", "256")).image_size == (256, 256)
    assert server_config(parse("--image-size", "240x320")).image_size == (240, 320)
    with pytest.raises(SystemExit):
        parse("--image-size", "256x")
    files = tiny_assets["aloha"]
    argv = ["serve", "--checkpoint", str(files.checkpoint), "--tokenizer", str(files.tokenizer), "--stats"]
    argv += [str(files.stats), "--text-embeddings", str(files.text_embeddings), "--platform", "aloha"]
    argv += ["--endpoint", f"tcp://127.0.0.1:{free_port()}", "--image-size", "256x256"]
    capsys.readouterr()
    assert main(argv) == 2  # refused before the models load
    assert "--image-size 256x256: an ALOHA server takes 224x224 frames" in capsys.readouterr().err


def test_curve_options_go_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give both or neither"):
        server_config(parse("--curve-clients", str(tmp_path)))


def test_network_settings_are_refused_before_any_policy_is_loaded() -> None:
    def make_policies(args: argparse.Namespace) -> dict[str, Policy]:
        raise AssertionError("loaded a policy for a server that cannot start")

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), make_policies)
    args = parser.parse_args(["serve", "--endpoint", "tcp://0.0.0.0:5555"])
    with pytest.raises(ConfigError, match="reachable from other machines"):
        args.func(args)


def test_http_options_become_an_http_config() -> None:
    pytest.importorskip("cosmos_edge.robot_bridge.http_server")  # needs the http extra
    assert http_config(parse()) is None
    config = http_config(parse("--http", "127.0.0.1:8777", "--max-message-mb", "0.5"))
    assert config is not None
    assert (config.host, config.port, config.insecure_bind_all) == ("127.0.0.1", 8777, False)
    # An observation whose ZeroMQ message fits the limit fits as an official /act body, base64 in JSON, too.
    json_numpy = pytest.importorskip("json_numpy")
    obs = observation()
    frames = ActRequest(1, obs_id=1, capture_time_ns=1, instruction=INSTRUCTION, **vars(obs)).to_frames()
    official = {key: obs.images[camera] for key, camera in CAMERAS.items()} | {"proprio": obs.proprio.astype(float)}
    body = json_numpy.dumps(official | {"task_description": INSTRUCTION}).encode()
    assert sum(len(frame) for frame in frames) <= 0.5 * 2**20 < len(body) <= config.max_body_bytes
    with pytest.raises(ConfigError, match="reachable from other machines"):
        http_config(parse("--http", "0.0.0.0:8777"))
    config = http_config(parse("--http", "0.0.0.0:8777", "--http-insecure-bind-all"))
    assert config is not None and config.insecure_bind_all
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        http_config(parse("--http", "8777"))
    assert config.request_read_timeout_s == 30.0  # the default: 5.4 MB at 1.4 Mbit/s
    slow_link = http_config(parse("--http", "127.0.0.1:8777", "--http-read-timeout-s", "120"))
    assert slow_link is not None and slow_link.request_read_timeout_s == 120.0


@pytest.mark.parametrize(
    ("preset", "options", "expected"),
    [
        ("main", {}, CandidateImageLists(per_depth=True)),
        ("base", {}, CandidateImageLists(per_depth=False)),
        ("base", {"ar_qvalue_prediction": True}, CandidateImageLists(per_depth=False)),
        ("base", {"ar_qvalue_prediction": True, "ar_future_prediction": True}, CandidateImageLists(per_depth=True)),
    ],
    ids=["world model", "action pass values", "model-free Q", "Q after a world model"],
)
def test_official_image_lists_follow_the_planning_options(
    preset: str, options: dict[str, bool], expected: CandidateImageLists
) -> None:
    lists = official_image_lists(planning_preset(preset, **options))
    assert lists == {"reactive": CandidateImageLists(), "planning": expected}
    assert official_image_lists(None) == {"reactive": CandidateImageLists()}


def test_endpoint_none_serves_http_only() -> None:
    with pytest.raises(ConfigError, match="--endpoint none: needs --http"):
        server_config(parse("--endpoint", "none"))
    assert server_config(parse("--endpoint", "none", "--http", "127.0.0.1:8777")).endpoint.startswith("inproc://")
    with pytest.raises(ConfigError, match="--endpoint inproc://foo: needs --http"):  # this process alone reaches it
        server_config(parse("--endpoint", "inproc://foo"))
    assert server_config(parse("--endpoint", "inproc://foo", "--http", "127.0.0.1:8777")).endpoint == "inproc://foo"


def test_serve_answers_http_beside_zeromq_until_sigterm() -> None:
    http_server = pytest.importorskip("cosmos_edge.robot_bridge.http_server")
    requests = pytest.importorskip("requests")
    endpoint, http_port = f"tcp://127.0.0.1:{free_port()}", free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_stub, args=(endpoint, http_server.HttpConfig(port=http_port)), daemon=True
    )
    process.start()
    try:
        with PolicyClient(endpoint, timeout_s=1.0) as client:
            wait_until_serving(client)
            metadata = requests.get(f"http://127.0.0.1:{http_port}/metadata", timeout=STARTUP_S).json()
            assert metadata["endpoints"]["zeromq"]["endpoint"] == endpoint
            health = requests.get(f"http://127.0.0.1:{http_port}/healthz", timeout=STARTUP_S)
            assert health.status_code == 200
        process.terminate()  # SIGTERM: the CLI's handler stops both endpoints cleanly
        process.join(STARTUP_S)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
