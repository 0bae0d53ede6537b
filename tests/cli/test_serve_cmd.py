"""`serve` arguments become a validated ServerConfig; the policy factory is the caller's."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import zmq.auth

from cosmos_edge.cli.serve_cmd import add_serve_parser, server_config
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.policy.api import Policy


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


def test_curve_options_go_together(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="give both or neither"):
        server_config(parse("--curve-clients", str(tmp_path)))


def test_joint_limits_are_passed_through() -> None:
    limits = ((-1.0, 1.0),) * 14
    assert server_config(parse(), limits).joint_limits == limits


def test_network_settings_are_refused_before_any_policy_is_loaded() -> None:
    def make_policies(args: argparse.Namespace) -> dict[str, Policy]:
        raise AssertionError("loaded a policy for a server that cannot start")

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(), make_policies)
    args = parser.parse_args(["serve", "--endpoint", "tcp://0.0.0.0:5555"])
    with pytest.raises(ConfigError, match="reachable from other machines"):
        args.func(args)
