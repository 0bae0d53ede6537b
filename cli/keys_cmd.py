"""`cosmos-edge keys generate DIR`: a CURVE key pair for the policy server or a controller.

Written by pyzmq's own `zmq.auth.create_certificates`: `DIR/NAME.key` (public: copy it to the peer; a server's
`--curve-clients` directory holds the `.key` of every admitted controller) and `DIR/NAME.key_secret` (secret: it stays
on this machine, readable by its owner only).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import zmq.auth

from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import write_error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="CURVE keys for the ZeroMQ endpoint")
    actions = parser.add_subparsers(dest="action", required=True)
    generate = actions.add_parser("generate", help="write a key pair: DIR/NAME.key and DIR/NAME.key_secret")
    generate.add_argument("directory", type=Path, metavar="DIR", help="where to write the pair (created if missing)")
    generate.add_argument("--name", default="cosmos-edge", help="file name of the pair, e.g. server or robot1")
    generate.set_defaults(func=_generate)


def generate_keys(directory: Path, name: str) -> tuple[Path, Path]:
    """Writes a new pair and returns (public, secret) paths; an existing pair is never overwritten."""
    if not name or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"--name: expected a plain file name, got {name!r}")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"DIR {directory}: is a file; expected the directory to write the pair in")
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path}: already exists; keys are never overwritten, choose another --name or DIR")
    try:
        directory.mkdir(parents=True, exist_ok=True)  # as any directory: others may read the public keys in it
    except OSError as error:
        raise write_error(f"DIR {directory}: cannot write the key pair", error) from None
    umask = os.umask(0o077)  # the secret is never readable by others, not even until a chmod
    try:
        written_public, written_secret = zmq.auth.create_certificates(directory, name)
        os.chmod(written_public, 0o644)  # the public half is meant to be copied
    except OSError as error:
        raise write_error(f"DIR {directory}: cannot write the key pair", error) from None
    finally:
        os.umask(umask)
    return Path(written_public), Path(written_secret)


def _generate(args: argparse.Namespace) -> int:
    public, secret = generate_keys(args.directory, args.name)
    print(f"public key: {public}")
    print(f"secret key: {secret} (keep it on this machine)")
    return 0
