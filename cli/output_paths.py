"""Output files of the command line, checked before the work whose result they hold: a path that cannot be written
is a usage error naming its flag, not a traceback after minutes of loading."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from cosmos_edge.runtime.errors import ConfigError, CosmosEdgeError, EngineError


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


def write_error(what: str, error: OSError) -> CosmosEdgeError:
    """The error of a write that failed after its path was checked: the machine's fault (a full disk or quota, an I/O
    error) is a failure, anything else (permissions, a file where a directory belongs) the path's: a usage error."""
    detail = f"{what}: {error.strerror or error}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
        return EngineError(detail)
    return ConfigError(detail)
