"""Policies for tests, loaded through the one loader: the reference (official files on eager torch) and bundles."""

from __future__ import annotations

from pathlib import Path

from cosmos_edge.runtime.bundle.loader import load_policies
from cosmos_edge.runtime.bundle.sources import BundleSource, CheckpointSource
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy.planning_config import PlanningConfig
from cosmos_edge.runtime.policy.reactive import ReactivePolicy

# A small planning configuration of every pass kind: 3 candidates, world-model steps (1, 3), value steps (1, 2).
SMALL_PLANNING = PlanningConfig(
    num_queries_best_of_n=3,
    num_denoising_steps_future_state=3,
    num_future_state_predictions_in_ensemble=2,
    num_denoising_steps_value=2,
    num_value_predictions_in_ensemble=2,
)


def reference_policy(files: CheckpointFiles, *, encode_full_sequence: bool = True) -> ReactivePolicy:
    """Official files on eager fp32 torch; by default with the official whole-sequence VAE encode."""
    return load_policies(CheckpointSource(files, encode_full_sequence=encode_full_sequence)).reactive


def bundle_policy(
    path: Path, backend: str = "onnxruntime", platform: str | None = None, *, future_images: bool | None = None
) -> ReactivePolicy:
    return load_policies(BundleSource(path, backend, platform), future_images=future_images).reactive
