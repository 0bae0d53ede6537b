"""`cosmos-edge checkpoint ...`: inspect official checkpoint files and create random ones."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect or create checkpoint files")
    parser.set_defaults(func=lambda args: parser.print_help() or 0)
