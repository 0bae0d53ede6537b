"""File helpers shared by the bundle reader and the engine caches: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Writes aside, then renames: a crash mid-write leaves a temporary file, never a truncated one under `path`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
