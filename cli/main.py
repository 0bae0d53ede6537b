"""Entry point of the `cosmos-edge` command: builds the argument parser from the subcommand modules."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cosmos_edge.cli import (
    act_cmd,
    checkpoint_cmd,
    client_cmd,
    demo_cmd,
    engines_cmd,
    export_cmd,
    keys_cmd,
    serve_cmd,
    text_embeddings_cmd,
)
from cosmos_edge.runtime.errors import CosmosEdgeError

# Each subcommand module exposes `register(subparsers)`; it sets `func(args) -> int` on its parser.
SUBCOMMANDS = (
    checkpoint_cmd,
    text_embeddings_cmd,
    export_cmd,
    engines_cmd,
    act_cmd,
    serve_cmd,
    client_cmd,
    keys_cmd,
    demo_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cosmos-edge", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except CosmosEdgeError as error:
        print(f"cosmos-edge: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
