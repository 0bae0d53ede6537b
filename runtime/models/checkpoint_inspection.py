"""What `cosmos-edge checkpoint inspect` reports: which network a file holds, its configuration and its problems."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from cosmos_edge.runtime.errors import CheckpointError
from cosmos_edge.runtime.models.checkpoint_io import non_finite_tensors, read_tensor_file
from cosmos_edge.runtime.models.dit_checkpoint import summarize_dit_checkpoint, summarize_dit_state_dict
from cosmos_edge.runtime.models.vae_checkpoint import DIFFUSERS_WEIGHTS, summarize_vae_state_dict, to_official_layout

# Tensor names only a Wan VAE has (in the original or the diffusers layout).
_VAE_MARKERS = ("encoder.conv1.weight", "encoder.conv_in.weight")


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """A JSON-ready report; raises CheckpointError when the file is neither a Cosmos DiT nor a Wan2.1 VAE."""
    path = Path(path)
    if path.is_dir():
        vae_dir = path / "vae" if (path / "vae").is_dir() else path
        weights = vae_dir / DIFFUSERS_WEIGHTS  # a VAE's file name, and a one-file transformer's too
        if weights.is_file() and not (path / "transformer").is_dir() and _holds_a_vae(weights):
            return _vae_report(path, read_tensor_file(weights))
        return _dit_report(path, lambda: summarize_dit_checkpoint(path))
    state = read_tensor_file(path)
    if any(marker in state for marker in _VAE_MARKERS):
        return _vae_report(path, state)
    return _dit_report(path, lambda: summarize_dit_state_dict(state))


def _holds_a_vae(weights: Path) -> bool:
    """Whether a diffusers safetensors file holds a Wan VAE, from its tensor names alone (not gigabytes of data)."""
    try:
        with safe_open(str(weights), framework="pt") as file:
            names = set(file.keys())
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{weights}: not a readable safetensors file: {error}") from None
    return any(marker in names for marker in _VAE_MARKERS)


def _dit_report(path: Path, summarize: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        summary = summarize()
    except CheckpointError as error:
        hint = (
            " (instruction embeddings? `cosmos-edge text-embeddings list` reads those)"
            if path.suffix == ".safetensors"
            else ""
        )
        raise CheckpointError(f"{path}: not a Cosmos-Predict2 DiT or a Wan2.1 VAE checkpoint{hint}: {error}") from None
    problems = _key_problems(summary) + _non_finite(summary.pop("non_finite"))
    problems += summary.pop("config_json_problems", [])
    return {"path": str(path), "network": "dit", **summary, "problems": problems}


def _vae_report(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    try:
        summary = summarize_vae_state_dict(state)
    except CheckpointError as error:  # too little of a VAE to tell its configuration
        raise CheckpointError(f"{path}: a Wan2.1 VAE checkpoint whose configuration cannot be read: {error}") from None
    return {
        "path": str(path),
        "network": "wan2.1-vae",
        "format": summary["format"],
        "config": summary["config"],
        "num_parameters": summary["parameters"],
        "dtypes": summary["dtypes"],
        "ignored_keys": [],
        "missing_keys": summary["missing_keys"],
        "unexpected_keys": summary["unexpected_keys"],
        "wrong_shapes": summary["wrong_shapes"],
        "problems": _key_problems(summary) + _non_finite(non_finite_tensors(to_official_layout(state))),
    }


def _key_problems(summary: dict[str, Any]) -> list[str]:
    problems = [f"missing key {key}" for key in summary["missing_keys"]]
    problems += [f"unexpected key {key}" for key in summary["unexpected_keys"]]
    return problems + [f"wrong shape of {wrong}" for wrong in summary["wrong_shapes"]]


def _non_finite(names: list[str]) -> list[str]:
    return [f"NaN or infinity in {name}" for name in names]
