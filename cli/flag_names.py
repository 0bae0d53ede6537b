"""Errors of the library name its settings ("endpoint: ..."); on the command line they name the flags instead."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping

from cosmos_edge.runtime.errors import ConfigError, ProtocolError


@contextlib.contextmanager
def naming_flags(flags: Mapping[str, str]) -> Iterator[None]:
    """Turns a `ConfigError` that names a setting of `flags` ("endpoint: ...") into one that names the flag that gave
    it ("--endpoint: ...")."""
    try:
        yield
    except (ConfigError, ProtocolError) as error:  # a setting, or a field of a request this command built
        name, separator, detail = str(error).partition(": ")
        if not separator or name not in flags:
            raise
        raise ConfigError(f"{flags[name]}: {detail}") from None


# The destinations of the options that give a file or folder (those of the command that ran are named).
_FILE_DESTS = frozenset(
    {
        "checkpoint",
        "tokenizer",
        "stats",
        "text_embeddings",
        "planning_checkpoint",
        "bundle",
        "curve_secret_key",
        "curve_server_key",
        "curve_clients",
        "out",
        "observation_flag",
    }
)


def naming_the_file_flag(args: argparse.Namespace, parser: argparse.ArgumentParser, message: str) -> str:
    """An error about a file an option of `parser` (the command that ran) gave, which the library names by its path
    ("PATH: ..." or "dataset statistics PATH: ..."), as one naming the option too ("--stats PATH: ..."; every
    option that gave it, if several did); any other message as it is. Positional arguments are not named."""
    head, separator, rest = message.partition(": ")
    if not separator or head.startswith("-"):
        return message
    options = {
        action.dest: max(action.option_strings, key=len)
        for action in parser._actions
        if action.option_strings and action.dest in _FILE_DESTS and getattr(args, action.dest, None) is not None
    }
    for dest in options:
        value = str(getattr(args, dest))
        if head == value or head.endswith(f" {value}"):
            flags = [flag for other, flag in options.items() if str(getattr(args, other)) == value]
            return f"{' and '.join(flags)} {value}: {rest}"
    return message
