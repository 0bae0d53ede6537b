"""Files shared by every layer: the official files of a policy, content hashes, atomic writes, locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cosmos_edge.runtime.errors import ConfigError, CosmosEdgeError, EngineError

_HASH_CHUNK = 16 << 20


@dataclass(frozen=True)
class CheckpointFiles:
    """The official files one policy needs (written by `models.random_assets` for tests and the demo, loaded by
    `bundle.loader`)."""

    checkpoint: Path
    tokenizer: Path
    stats: Path
    text_embeddings: Path
    platform: str


def starts_like_a_pickle(head: bytes) -> bool:
    """Whether a file's first bytes open a Python pickle of protocol 2 or later (the official T5 embeddings are one,
    and so are checkpoints of torch before 1.6)."""
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def starts_like_json(head: bytes) -> bool:
    """Whether a file's first bytes open a JSON object or list (a statistics file given for another)."""
    return head.lstrip().startswith((b"{", b"["))


def same_file(first: Path, second: Path) -> bool:
    """Whether two paths name one file, however spelled; False when either is missing (named where it is read)."""
    try:
        return first.samefile(second)
    except OSError:
        return False


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def graph_files_digest(files: Iterable[tuple[str, str]]) -> str:
    """The digest of an ONNX graph's files from each one's (name, sha256), in order: what a TensorRT engine records
    of the graph it was built from (an engine depends on the weights in external-data files too)."""
    digest = hashlib.sha256()
    for name, sha256 in files:
        digest.update(f"{name}\0{sha256}\0".encode())
    return digest.hexdigest()


# Errors of a path (or its folder), rather than of the machine (a full disk, an I/O error): what was given is wrong.
PATH_FAULTS = frozenset(
    {errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENAMETOOLONG, errno.ELOOP}
)


def write_error(what: str, error: OSError) -> CosmosEdgeError:
    """The error of a write that failed ("PATH: cannot be written (why)"): the path's fault (permissions, a file
    where a folder belongs) is a `ConfigError`, the machine's (a full disk or quota, an I/O error) an `EngineError`."""
    kind = ConfigError if error.errno in PATH_FAULTS else EngineError
    return kind(f"{what} ({error.strerror or error})")


def write_atomic(path: Path, data: bytes) -> None:
    """Writes aside, then renames: a crash mid-write leaves a temporary file, never a truncated one under `path`.
    A write that fails (a full disk: engines are gigabytes) raises `write_error`'s error naming `path`."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    except BaseException as error:  # a full disk, Ctrl-C: no hidden file of gigabytes (an engine) left behind
        partial.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(f"{path}: cannot be written", error) from None
        raise


def writable_folder(folder: Path, purpose: str) -> None:
    """Makes `folder` if it is missing, and checks that files can be written there; raises `EngineError` naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EngineError(f"{folder}: cannot make the folder for {purpose} ({error.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise EngineError(f"{folder}: not writable, so it cannot hold {purpose}")


@contextlib.contextmanager
def exclusive_lock(path: Path, *, wait: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Holds an exclusive lock on `path` (made if missing) for the block, between processes: the system releases it
    when its holder exits, killed or not. Another process holding it is waited for (`on_wait` is called first, to
    say so); with `wait=False` the block runs at once, without the lock, told by the value yielded (False)."""
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise EngineError(f"{path}: cannot make the lock file ({error.strerror or error})") from None
    try:
        held = _lock_now(handle)
        if not held and wait:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
            held = True
        yield held
    finally:
        os.close(handle)  # releases the lock


def _lock_now(handle: int) -> bool:
    """Takes the exclusive lock of `handle` if no other process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
