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


# The flags that give a file or folder, by their destinations in the parsed arguments.
_FILE_FLAGS = {
    dest: "--" + dest.replace("_", "-")
    for dest in (
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
    )
} | {"observation_flag": "--observation"}


def naming_the_file_flag(args: argparse.Namespace, message: str) -> str:
    """An error about a file a flag gave, which the library names by its path ("PATH: ..." or "dataset statistics
    PATH: ..."), as one naming the flag too ("--stats PATH: ..."; every flag that gave it, if several did); any
    other message as it is."""
    head, separator, rest = message.partition(": ")
    if not separator or head.startswith("-"):
        return message
    for dest in _FILE_FLAGS:
        value = getattr(args, dest, None)
        if value is not None and (head == str(value) or head.endswith(f" {value}")):
            flags = [flag for other, flag in _FILE_FLAGS.items() if str(getattr(args, other, None)) == str(value)]
            return f"{' and '.join(flags)} {value}: {rest}"
    return message
