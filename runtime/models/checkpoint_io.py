"""Reading tensor files safely: `.pt` with `weights_only=True` (memory-mapped), and safetensors.

Nothing here ever runs code from a file. A `.pt` that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors

from cosmos_edge.runtime.errors import CheckpointError
from cosmos_edge.runtime.files import starts_like_a_pickle, starts_like_json

StateDict = dict[str, torch.Tensor]

_LOG = logging.getLogger(__name__)

# Official checkpoints are a flat dict of tensors; some trainers wrap it once under one of these keys.
WRAPPER_KEYS = ("model", "state_dict", "net")


def read_tensor_file(path: str | Path) -> StateDict:
    """Returns the flat tensor dict stored in `path` (`.pt`/`.pth` or `.safetensors`)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: the file is empty; expected a PyTorch checkpoint")
    if path.suffix == ".safetensors":
        try:
            return dict(load_safetensors(str(path)))
        except SafetensorError as error:
            raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from None
        except OSError as error:
            raise _unreadable(path, error) from None
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as error:
        raise _unreadable(path, error) from None
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive (since torch 1.6); mmap needs one
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (torch.save writes a zip archive; this file starts with {magic!r}); "
            + _what_it_may_be(magic)
        )
    _check_torch_archive(path)
    try:
        # mmap keeps the 2B checkpoint out of RAM until each tensor is copied into the network.
        # Transformer-Engine stores `_extra_state` as BytesIO; rebuilding one from bytes runs no code.
        with torch.serialization.safe_globals([io.BytesIO]):
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused, the file needs arbitrary unpickling (it could run code); "
            f"cosmos-edge only loads tensor-only checkpoints (torch.load weights_only=True): {_refusal(error)}"
        ) from error
    except RuntimeError as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {error}") from error
    except OSError as error:
        raise _unreadable(path, error) from None
    return _unwrap(loaded, path)


def _unreadable(path: Path, error: OSError) -> CheckpointError:
    return CheckpointError(f"{path}: cannot be read ({error.strerror or error})")


def _check_torch_archive(path: Path) -> None:
    """A zip archive that torch.save did not write (an .npz, say) is named as what it is: torch.load's own error
    on one is an internal assertion."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (a damaged zip archive: {error})") from None
    if not any(name.endswith("data.pkl") for name in members):
        kind = "a numpy .npz archive" if members and all(m.endswith(".npy") for m in members) else "a zip archive"
        raise CheckpointError(f"{path}: {kind}, not a PyTorch checkpoint (torch.save archives hold a data.pkl)")


def elements_per_dtype(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """Elements per dtype name ("bfloat16": n, ...), sorted by name: what `checkpoint inspect` reports."""
    elements: Counter[str] = Counter()
    for tensor in tensors:
        elements[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return dict(sorted(elements.items()))


def non_finite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating tensors holding NaN or infinity, sorted: weights that make every output NaN. (float8
    tensors are widened first: torch has no isfinite for them.)"""
    return sorted(
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point()
        and not tensor.is_meta  # shapes only: no values to check
        and not torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float()).all()
    )


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object of a configuration file (a diffusers `config.json`); CheckpointError naming it otherwise."""
    try:
        loaded = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable JSON file: {error}") from None
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(loaded).__name__}")
    return loaded


def _what_it_may_be(magic: bytes) -> str:
    """A guess at what a file that is no torch zip archive holds, from its first bytes."""
    if starts_like_json(magic):
        return "it looks like JSON (the dataset statistics?)"
    if starts_like_a_pickle(magic):
        return (
            "it is a Python pickle: the official T5 embeddings (`cosmos-edge text-embeddings convert` reads those), "
            "or a checkpoint saved by torch < 1.6, which must be saved again"
        )
    return "is it the right file? (a checkpoint saved by torch < 1.6 must be saved again)"


def _refusal(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file needs (its message spans paragraphs, with colour codes
    and the advice to load with weights_only=False, which is exactly what must not be done here)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]  # "unsupported GLOBAL posix.system ...", and similar
    return named[0] if named else "it holds objects other than tensors"


def _unwrap(loaded: object, path: Path) -> StateDict:
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            inner = loaded.get(key)
            if _is_state_dict(inner):
                # A trainer's EMA copy beside the weights is a state dict too: say which one is used.
                others = sorted(str(k) for k, v in loaded.items() if k != key and _is_state_dict(v))
                if others:
                    _LOG.warning("%s: loading the weights under %r; not those under %s", path, key, others)
                loaded = inner
                break
        tensors = {k: _as_tensor(v) for k, v in loaded.items() if _is_entry(k, v)}
        if tensors:
            return tensors
    raise CheckpointError(
        f"{path}: expected a dict of tensors (optionally under one of {WRAPPER_KEYS}), "
        f"got {type(loaded).__name__} with no tensors"
    )


def _is_state_dict(value: object) -> TypeGuard[Mapping[Any, Any]]:
    return isinstance(value, Mapping) and bool(value) and all(_is_entry(k, v) for k, v in value.items())


def _is_entry(key: object, value: object) -> bool:
    """A state dict entry: a tensor, or Transformer-Engine's `_extra_state` as its older versions save it."""
    return isinstance(value, torch.Tensor) or (
        isinstance(key, str) and key.endswith("_extra_state") and isinstance(value, io.BytesIO)
    )


def _as_tensor(value: torch.Tensor | io.BytesIO) -> torch.Tensor:
    """An older `_extra_state` (BytesIO) as newer Transformer-Engine versions save it: a uint8 tensor of its bytes,
    so that every extra state is listed and dropped alike."""
    return (
        value if isinstance(value, torch.Tensor) else torch.frombuffer(bytearray(value.getvalue()), dtype=torch.uint8)
    )
