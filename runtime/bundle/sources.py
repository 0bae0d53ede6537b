"""Where a serving process's models come from: official checkpoint files (torch), or an exported bundle."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cosmos_edge.runtime import precision as defaults
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.engines.registry import load_torch_backend
from cosmos_edge.runtime.errors import ConfigError
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.precision import PRECISIONS, check_compile_scope


@dataclass(frozen=True)
class CheckpointSource:
    """Official files on the torch backend. `planning_checkpoint`: the planning model's DiT (None: the policy's,
    which is then loaded once and shared). `encode_full_sequence`: the official whole-clip VAE encode (the
    reference); the default encodes the causal conditioning prefix, which gives the same latents. `compile_scope`:
    with a `compile_mode`, what of the DiT is compiled (`COMPILE_SCOPES`). `cuda_graphs`: replay the conditioning
    encode and the batch-1 DiT calls from CUDA graphs (CUDA devices only)."""

    files: CheckpointFiles
    planning_checkpoint: Path | None = None
    precision: str = "fp32"
    compile_mode: str | None = None
    compile_scope: str = "model"
    encode_full_sequence: bool = False
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        platform_spec(self.files.platform)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: expected one of {PRECISIONS}, got {self.precision!r}")
        check_compile_scope(self.compile_scope)

    @classmethod
    def for_devices(
        cls,
        files: CheckpointFiles,
        devices: Sequence[str],
        *,
        planning_checkpoint: Path | None = None,
        precision: str | None = None,
        compile: bool | None = None,
        compile_scope: str = "model",
        cuda_graphs: bool | None = None,
        reference: bool = False,
    ) -> CheckpointSource:
        """The source `act` and `serve` open for `devices` (empty: CUDA when torch sees it, else the CPU): each
        option left None takes their
        default for those devices (bf16, compiled and replayed from CUDA graphs on CUDA; fp32, eager on the CPU).
        `reference`: the official whole-sequence path, uncompiled, without graphs (`act --reference`)."""
        if reference and (compile or cuda_graphs):
            raise ConfigError(
                f"reference: runs the official path uncompiled, without graphs; got compile={compile}, "
                f"cuda_graphs={cuda_graphs}"
            )
        targets = list(devices) or [load_torch_backend().default_device()]  # as the loader's default
        return cls(
            files,
            planning_checkpoint=planning_checkpoint,
            precision=precision or defaults.default_precision(targets),
            compile_mode=None if reference else defaults.compile_mode(compile, targets),
            compile_scope=compile_scope,
            encode_full_sequence=reference,
            cuda_graphs=False if reference else defaults.cuda_graphs(cuda_graphs, targets),
        )


@dataclass(frozen=True)
class BundleSource:
    """An exported bundle on an engine backend ("onnxruntime" or "tensorrt"); `platform`, if given, must be the
    bundle's."""

    path: Path
    backend: str = "onnxruntime"
    platform: str | None = None

    @functools.cached_property
    def bundle(self) -> Bundle:
        """The bundle, opened once for every use of this source (its manifest read and checked once, each file it
        lists hashed at most once: a 2B bundle holds gigabytes), and refused if built for another `platform`."""
        bundle = Bundle.open(self.path)
        bundle.check_platform(self.platform)
        return bundle


ModelSource = CheckpointSource | BundleSource
