"""Errors of the library name its settings ("endpoint: ..."); on the command line they name the flags instead."""

from __future__ import annotations

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
