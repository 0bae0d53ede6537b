"""CURVE keys for the bridge: who may talk to the policy server, and how the client proves it.

ZeroMQ CURVE gives encryption and mutual authentication with Curve25519 keys. The server admits only the client
public keys it was given (an allowlist): encryption alone would still let any peer drive the robot. Keys are the
40-character Z85 text form that `zmq.curve_keypair()` returns and `zmq.auth.create_certificates` writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from cosmos_edge.robot_bridge.log_limits import RateLimitedLog, peer_text
from cosmos_edge.runtime.errors import ConfigError

_LOG = logging.getLogger(__name__)

Z85_KEY_LENGTH = 40


def check_key(name: str, key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != Z85_KEY_LENGTH:
        got = f"{len(key)} bytes" if isinstance(key, bytes) else type(key).__name__
        raise ConfigError(f"{name}: expected a {Z85_KEY_LENGTH}-byte Z85 CURVE key, got {got}")
    try:
        z85.decode(key)
    except (ValueError, KeyError):  # z85 raises KeyError for a character outside its alphabet
        raise ConfigError(f"{name}: not valid Z85 text") from None


@dataclass(frozen=True)
class CurveKeyPair:
    public: bytes
    secret: bytes = field(repr=False)  # never in logs or tracebacks

    def __post_init__(self) -> None:
        check_key("public", self.public)
        check_key("secret", self.secret)

    @classmethod
    def load(cls, path: str | Path) -> CurveKeyPair:
        """Reads a `.key_secret` certificate written by `zmq.auth.create_certificates`."""
        public, secret = _read_certificate(path)
        if secret is None:
            raise ConfigError(f"{path}: holds no secret key; expected the '.key_secret' file of the pair")
        return cls(public, secret)


@dataclass(frozen=True)
class ServerCurve:
    """The server's key pair and the public keys of the clients it admits."""

    keys: CurveKeyPair
    allowed_clients: frozenset[bytes]

    def __post_init__(self) -> None:
        if not self.allowed_clients:
            raise ConfigError("allowed_clients: expected at least one client public key, got none")
        for key in self.allowed_clients:
            check_key("allowed_clients", key)


def load_public_key(path: str | Path) -> bytes:
    """The public key of a certificate written by `zmq.auth.create_certificates`: its `.key` file. The
    `.key_secret` file is refused: a secret key belongs only on the machine it identifies."""
    public, secret = _read_certificate(path)
    if secret is not None:
        raise ConfigError(
            f"{path}: holds a secret key; give the public '.key' file of the pair (the secret stays where it belongs)"
        )
    check_key(str(path), public)
    return public


def _read_certificate(path: str | Path) -> tuple[bytes, bytes | None]:
    # Checked first: pyzmq reports a missing file as a plain OSError ("Invalid certificate file").
    if not Path(path).is_file():
        raise ConfigError(f"{path}: no such file; expected a CURVE certificate (cosmos-edge keys generate writes them)")
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:  # unreadable, or a file without a public key
        raise ConfigError(f"{path}: expected a CURVE certificate from zmq.auth.create_certificates ({error})") from None


def load_public_keys(directory: str | Path) -> frozenset[bytes]:
    """Public keys of every `.key` certificate in `directory` (the allowlist of a server)."""
    if not Path(directory).is_dir():
        raise ConfigError(f"{directory}: expected a directory of client '.key' certificates")
    certificates = sorted(Path(directory).glob("*.key"))
    if not certificates:
        raise ConfigError(f"{directory}: holds no client '.key' certificate (cosmos-edge keys generate writes them)")
    return frozenset(load_public_key(path) for path in certificates)


def start_authenticator(context: zmq.Context[zmq.Socket[bytes]], curve: ServerCurve) -> ThreadAuthenticator:
    """Starts the ZAP handler that admits `curve.allowed_clients`; start it before binding the CURVE socket."""
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    authenticator.configure_curve_callback(domain="*", credentials_provider=_Allowlist(curve.allowed_clients))
    return authenticator


class _Allowlist:
    """ZAP credentials provider: admits exactly the listed client public keys (Z85)."""

    def __init__(self, keys: frozenset[bytes]) -> None:
        self._keys = keys
        # A peer can open handshakes with new keys as fast as it likes: a few lines a minute, then a count. One owner
        # thread: the authenticator's.
        self._refusals = RateLimitedLog(_LOG, interval_s=60.0, max_lines=5)

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self._keys
        if not allowed:
            text = key.decode("ascii", "replace")
            self._refusals.log(text, logging.WARNING, "refused a CURVE client with an unlisted key %s", peer_text(text))
        return allowed
