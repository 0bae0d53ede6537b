"""Output files of the command line, checked before the work whose result they hold: a path that cannot be written
is a usage error naming its flag, not a traceback after minutes of loading."""

from __future__ import annotations

import os
from pathlib import Path

from cosmos_edge.runtime.errors import ConfigError


def writable_file(flag: str, path: Path, *, replace: bool = True) -> Path:
    """`path`, if a file can be written there; an existing file is replaced only with `replace`. `flag` is the
    option (`--out`) or, for a positional argument, its metavar."""
    named = f"{flag} {path}" if flag.startswith("-") else f"{path} ({flag})"
    if path.is_dir():
        raise ConfigError(f"{named}: is a directory; expected the path of a file")
    if not replace and path.exists():
        raise ConfigError(f"{named}: exists, and is never replaced; choose another path")
    directory = path.parent
    if not directory.is_dir():
        raise ConfigError(f"{named}: no directory {directory}")
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"{named}: cannot write in {directory}")
    return path


def require_out(flag: str, what: str, out: Path | None) -> None:
    """Refuses `flag` without `--out`, when `what` it asks for is written only to that file."""
    if out is None:
        raise ConfigError(f"{flag}: {what} written to the --out file; give --out")
