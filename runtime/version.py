"""The version of cosmos-edge that runs, as `--version` prints it and a server reports it."""

from __future__ import annotations

from importlib import metadata


def installed_version() -> str:
    try:
        return metadata.version("cosmos-edge")
    except metadata.PackageNotFoundError:  # a source tree on the path, never installed: everything else runs
        return "unknown (not installed; running from a source tree)"
