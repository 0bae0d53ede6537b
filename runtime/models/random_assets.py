"""Random-weight models in the official file formats: for tests, CPU benchmarks and the embedded default.

A directory written here holds exactly what a user downloads for one platform: the DiT `.pt` (flat `net.*`
tensors), the Wan2.1 `tokenizer.pth`, the dataset statistics JSON and the instruction embeddings (safetensors, as
`text-embeddings convert` writes them). Everything is deterministic for a seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cosmos_edge.runtime.errors import ConfigError, EngineError
from cosmos_edge.runtime.files import CheckpointFiles, write_error
from cosmos_edge.runtime.models.dit_checkpoint import random_dit_state_dict
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.vae_checkpoint import random_vae_state_dict
from cosmos_edge.runtime.models.wan_vae import vae_config
from cosmos_edge.runtime.platforms import PlatformSpec, platform_spec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.text_embeddings import TEXT_TOKENS

_LOG = logging.getLogger(__name__)

# The DiT preset → the VAE it is paired with. `small` keeps the real VAE so CPU benchmarks see its true cost.
VAE_FOR_DIT = {"tiny": "tiny", "small": "wan2.1", "predict2-2b": "wan2.1"}

SAMPLE_INSTRUCTIONS = {
    "libero": ("put both the alphabet soup and the tomato sauce in the basket", "open the top drawer of the cabinet"),
    "robocasa": ("open the microwave door", "pick the apple from the counter and place it in the sink"),
    "aloha": ("fold the t-shirt", "put the candy in the bag", "put the eggplant and the chicken on the plate"),
}


@dataclass(frozen=True)
class RandomAssetsSpec:
    config: str = "tiny"
    platform: str = "aloha"
    seed: int = 0
    dtype: str = "fp32"


def random_asset_paths(out_dir: str | Path, spec: RandomAssetsSpec = RandomAssetsSpec()) -> CheckpointFiles:
    """Where `write_random_assets` puts each file: the official file names."""
    out = Path(out_dir)
    return CheckpointFiles(
        checkpoint=out / f"cosmos_policy_{spec.platform}_{spec.config}.pt",
        tokenizer=out / "tokenizer.pth",
        stats=out / f"{spec.platform}_dataset_statistics.json",
        text_embeddings=out / f"{spec.platform}_t5_embeddings.safetensors",
        platform=spec.platform,
    )


def write_random_assets(out_dir: str | Path, spec: RandomAssetsSpec = RandomAssetsSpec()) -> CheckpointFiles:
    """Writes a random official-format model for `spec.platform` into `out_dir` and returns its file paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: is a file; expected a directory for the model files; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{out}: cannot write the model files there ({error}); choose another --out") from None
    platform = platform_spec(spec.platform)
    dtype = TORCH_DTYPES[spec.dtype]
    dit = dit_config(spec.config)
    files = random_asset_paths(out, spec)
    rng = np.random.default_rng(spec.seed + 2)
    embeddings = {
        instruction: rng.standard_normal((1, TEXT_TOKENS, dit.text_dim)).astype(np.float32)
        for instruction in SAMPLE_INSTRUCTIONS[spec.platform]
    }
    vae = vae_config(VAE_FOR_DIT[spec.config])
    # Each made when written: the 2B DiT's state dict is 8 GB in fp32, and is released before the VAE's is made.
    writers: list[tuple[Path, Callable[[Path], None]]] = [
        (files.checkpoint, lambda path: _save(random_dit_state_dict(dit, spec.seed, dtype), path)),
        (files.tokenizer, lambda path: _save(random_vae_state_dict(vae, spec.seed + 1, dtype), path)),
        (files.stats, random_stats(platform, spec.seed).write_json),
        (files.text_embeddings, lambda path: text_store.write(path, embeddings)),
    ]
    written: list[Path] = []
    try:
        for index, (path, write) in enumerate(writers, start=1):
            written.append(path)
            _LOG.info("writing %s (file %d/%d)", path, index, len(writers))  # the 2B DiT takes a minute or so
            write(path)
    except BaseException as error:  # Ctrl-C included: a partial model would block the next run, which never replaces
        for path in written:  # files
            path.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(f"{written[-1]}: cannot be written", error) from None
        raise
    return files


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        torch.save(state, path)
    except RuntimeError as error:  # torch.save's failed write (a full disk) is a RuntimeError of its C++ stream
        raise EngineError(f"{path}: cannot be written ({error})") from None


def random_stats(platform: PlatformSpec, seed: int) -> DatasetStats:
    """Plausible per-dimension ranges: joint-like spans of 0.5 to 3 around random centres."""
    rng = np.random.default_rng(seed + 3)

    def ranges(dim: int) -> tuple[np.ndarray, np.ndarray]:
        centre = rng.uniform(-0.5, 0.5, dim)
        half_span = rng.uniform(0.25, 1.5, dim)
        return centre - half_span, centre + half_span

    actions_min, actions_max = ranges(platform.action_dim)
    proprio_min, proprio_max = ranges(platform.proprio_dim)
    return DatasetStats(actions_min, actions_max, proprio_min, proprio_max)
