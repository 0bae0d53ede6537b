"""`cosmos-edge export`: official checkpoint files -> a self-describing bundle directory (see `runtime.bundle`).

The bundle is assembled in a hidden sibling directory (`.NAME.partial-*`) and renamed to its final name only after
the manifest, written last, is in place. An interrupted export therefore leaves either nothing at the destination
or, after a hard kill, a hidden `.partial` directory (with or without its manifest), which nothing opens as a bundle
and the next export removes.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import glob
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import onnx
import torch

from cosmos_edge.export.onnx_export import (
    OPSET,
    ExportedGraph,
    export_dit,
    export_text_kv,
    export_vae_cameras_encoder,
    export_vae_decoder,
    export_vae_encoder,
)
from cosmos_edge.runtime.bundle.manifest import (
    FORMAT_TAG,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Bundle,
    BundleManifest,
    GraphRecord,
    ModelRecord,
    check_batch_sizes,
    file_record,
    write_manifest,
)
from cosmos_edge.runtime.engines.graph import (
    GraphSpec,
    dit_graph,
    text_kv_graph,
    vae_decoder_graph,
    vae_encoder_graph,
)
from cosmos_edge.runtime.errors import BundleError, CheckpointError, ConfigError, EngineError
from cosmos_edge.runtime.files import exclusive_lock, same_file
from cosmos_edge.runtime.models.checkpoint_io import non_finite_tensors
from cosmos_edge.runtime.models.dit_checkpoint import dit_checkpoint_config, dit_non_finite_parameters, load_dit
from cosmos_edge.runtime.models.dtypes import TORCH_DTYPES
from cosmos_edge.runtime.models.vae_checkpoint import load_wan_vae
from cosmos_edge.runtime.platforms import PlatformSpec, platform_spec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.precision import vae_graph_precision

_LOG = logging.getLogger(__name__)

GRAPHS_DIR = "graphs"
TEXT_EMBEDDINGS_FILE = "text_embeddings.safetensors"
STATS_FILE = "dataset_statistics.json"
_WRITING_LOCK = ".export.lock"  # in a staging folder, held by the export writing it
_LOCK_GRACE_S = 60.0  # an export takes its lock right after making its staging folder


@dataclass(frozen=True)
class ExportRequest:
    """What to export. `future_images=False` leaves out the full-sequence encoder and the decoder (bundles that
    cannot return future images: smaller, faster to export); `planning_checkpoint` adds `planning_dit_b*` graphs for
    the same batches."""

    checkpoint: Path
    tokenizer: Path
    stats: Path
    text_embeddings: Path
    platform: str
    out: Path
    batch_sizes: tuple[int, ...] = (1,)
    precision: str = "bf16"
    planning_checkpoint: Path | None = None
    future_images: bool = True

    def __post_init__(self) -> None:
        platform_spec(self.platform)  # raises ConfigError listing the known platforms
        if self.precision not in TORCH_DTYPES:
            raise ConfigError(f"precision: expected one of {sorted(TORCH_DTYPES)}, got {self.precision!r}")
        object.__setattr__(self, "batch_sizes", check_batch_sizes(self.batch_sizes))
        for name in ("checkpoint", "tokenizer", "stats", "text_embeddings", "planning_checkpoint"):
            path = getattr(self, name)
            if path is not None and not Path(path).exists():
                raise ConfigError(f"{name}: {path}: no such file or directory")


class _GraphWriter:
    """Exports graphs into `root/graphs`, records them for the manifest and logs progress as "graph i/n"."""

    def __init__(self, root: Path, total: int) -> None:
        self.root = root
        self.total = total
        self.records: dict[str, GraphRecord] = {}

    def add(self, role: str, spec: GraphSpec, export: Callable[[GraphSpec, Path], ExportedGraph]) -> None:
        _LOG.info("exporting %s (graph %d/%d)", spec.name, len(self.records) + 1, self.total)
        exported = export(spec, self.root / GRAPHS_DIR / f"{spec.name}.onnx")
        external = exported.external_data
        self.records[spec.name] = GraphRecord(
            role=role,
            batch=spec.inputs[0].shape[0],
            file=exported.path.relative_to(self.root).as_posix(),
            external_data=None if external is None else external.relative_to(self.root).as_posix(),
            spec=spec,
        )


def prepare_bundle_path(out: Path) -> Path:
    """The absolute path a bundle will be written at, after removing what killed exports to it left behind.

    A bundle is written where nothing is (or an empty directory, which the final rename replaces, but not the current
    directory: the process and its shell would be left in a removed one), in a directory that exists (a typo makes
    none): refused before minutes of export otherwise."""
    out = Path(os.path.abspath(out))  # `.` and `..` resolved: the staging folder goes beside the bundle, not in it
    _remove_interrupted_exports(out)  # first: a killed export's folder goes even if this export is refused
    if out.is_dir() and out.samefile(Path.cwd()):  # however its path is spelled (a link in it, say)
        raise BundleError(f"{out}: the current directory cannot become the bundle; give --out a name inside it")
    _check_new_bundle_path(out)
    return out


def _check_new_bundle_path(out: Path) -> None:
    if out.is_file() and not out.is_symlink():
        raise BundleError(f"{out}: is a file; a bundle is a directory: choose another --out")
    # A link (a dangling one too) is taken: the rename could not replace it.
    if out.is_symlink() or (out.exists() and not (out.is_dir() and not any(out.iterdir()))):
        raise BundleError(f"{out}: already exists and is not an empty directory; remove it or choose another --out")
    if not out.parent.is_dir():
        raise BundleError(f"{out}: no directory {out.parent}; make it first or choose another --out")


def export_bundle(request: ExportRequest) -> Bundle:
    """Writes the bundle at `request.out` (a new or empty directory) and returns it opened."""
    out = prepare_bundle_path(request.out)
    if request.planning_checkpoint is not None and same_file(request.planning_checkpoint, request.checkpoint):
        _LOG.warning(
            "planning checkpoint %s is the policy's: the bundle plans with the policy's DiT graphs (not exported "
            "twice)",
            request.planning_checkpoint,
        )
        request = dataclasses.replace(request, planning_checkpoint=None)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    except OSError as error:
        raise BundleError(f"{out}: cannot write a bundle there ({error}); choose another --out") from None
    # Held while the export lives: a later export tells a staging folder whose writer died by its free lock.
    with exclusive_lock(staging / _WRITING_LOCK):
        try:
            _write_staged(request, staging, out)
            staging.chmod(_directory_mode())  # mkdtemp makes it private (0700); a bundle is read like its files
            _check_new_bundle_path(out)  # again: another export or a user may have filled it meanwhile
            try:
                os.rename(staging, out)  # atomic within one filesystem: the bundle appears whole or not at all
            except OSError as error:
                detail = error.strerror
                raise BundleError(f"{out}: cannot put the bundle there ({detail}); choose another --out") from None
            (out / _WRITING_LOCK).unlink()  # unlisted: no part of the bundle
        except BaseException:  # KeyboardInterrupt included: never leave a half-written bundle behind
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _LOG.info("bundle written: %s", out)
    return Bundle.open(out)


def _write_staged(request: ExportRequest, staging: Path, out: Path) -> None:
    """The bundle's files and manifest into `staging`; a failed write (a full disk: a 2B DiT graph is gigabytes per
    batch size) names `out`, whose staging folder the caller removes. The inputs' read errors are CheckpointErrors:
    an OSError here is a write's."""
    failed = f"{out}: writing the bundle failed"
    try:
        contents = _write_contents(request, staging)
    except OSError as error:
        raise EngineError(f"{failed} ({error.strerror or error}); nothing was left behind") from None
    try:
        write_manifest(staging, contents)
    except EngineError as error:  # write_atomic's, naming the staging folder the caller removes
        raise EngineError(f"{failed} ({error}); nothing was left behind") from None


def _staging_prefix(out: Path) -> str:
    """Staging folders are named `.NAME.partial-PID-XXXX` (the pid of the export that writes it, for its user)."""
    return f".{out.name}.partial-"


def _remove_interrupted_exports(out: Path) -> None:
    """Staging folders of earlier exports to the same name that were killed before they could clean up: their
    writer's lock is free (the system frees it with the process; a pid may already belong to another one). Those of
    an export still running, or one younger than `_LOCK_GRACE_S` (its writer may not hold its lock yet), stay."""
    prefix = _staging_prefix(out)
    for staging in sorted(out.parent.glob(glob.escape(prefix) + "*")):
        pid, _, suffix = staging.name.removeprefix(prefix).partition("-")
        if not (pid.isdigit() and re.fullmatch(r"[a-z0-9_]{8}", suffix)):  # not a name mkdtemp gave an export
            continue
        try:
            young = time.time() - staging.stat().st_mtime < _LOCK_GRACE_S  # before the lock file touches it
            with exclusive_lock(staging / _WRITING_LOCK, wait=False) as free:
                if not free:
                    _LOG.warning("%s: another export of %s (pid %s) is writing it", staging, out.name, pid)
                    continue
                if young:
                    _LOG.warning(
                        "%s: kept, as an export of %s (pid %s) began it less than %.0f s ago; if that export was "
                        "killed, the next export of %s removes it",
                        staging,
                        out.name,
                        pid,
                        _LOCK_GRACE_S,
                        out.name,
                    )
                    continue
                _LOG.warning("removing %s, left by an interrupted export of %s", staging, out.name)
                shutil.rmtree(staging, ignore_errors=True)
        except (EngineError, OSError):  # another user's, or gone meanwhile: not ours to remove
            continue


def _directory_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _write_contents(request: ExportRequest, root: Path) -> BundleManifest:
    platform = platform_spec(request.platform)
    DatasetStats.from_json(request.stats, platform)  # refuse statistics of another platform before exporting
    texts = text_store.read(request.text_embeddings)
    _, text_tokens, text_dim = texts.shape
    (root / GRAPHS_DIR).mkdir()

    for checkpoint in (request.checkpoint, request.planning_checkpoint):  # a wrong file named before minutes of export
        if checkpoint is not None:
            dit_text_dim = dit_checkpoint_config(checkpoint).text_dim
            text_store.check_fits_dit(texts, f"text_embeddings: {request.text_embeddings}", checkpoint, dit_text_dim)
            dtype = TORCH_DTYPES[request.precision]
            _refuse_non_finite(dit_non_finite_parameters(checkpoint, dtype), checkpoint, request.precision)
    dits = 2 if request.planning_checkpoint is not None else 1
    # Per DiT: a graph per batch size and its text-K/V graph; the VAE: the cameras encoder, + two for future images.
    writer = _GraphWriter(root, dits * (len(request.batch_sizes) + 1) + (3 if request.future_images else 1))
    vae_config = _export_vae_graphs(request, platform, writer)  # first: small, and a wrong --tokenizer shows at once
    dit_config = _export_dit_graphs(request, request.checkpoint, "dit", platform, texts.shape, writer)
    planning_config = None
    if request.planning_checkpoint is not None:
        planning_config = _export_dit_graphs(
            request, request.planning_checkpoint, "planning_dit", platform, texts.shape, writer
        )

    text_store.write(root / TEXT_EMBEDDINGS_FILE, texts)
    shutil.copyfile(request.stats, root / STATS_FILE)
    _LOG.info("hashing %d files", sum(1 for _ in _files(root)))
    return BundleManifest(
        schema_version=SCHEMA_VERSION,
        format=FORMAT_TAG,
        created_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        platform=platform,
        precision=request.precision,
        batch_sizes=request.batch_sizes,
        onnx_opset=OPSET,
        model=ModelRecord(dit_config, vae_config, planning_config, text_tokens, text_dim),
        graphs=writer.records,
        text_embeddings=TEXT_EMBEDDINGS_FILE,
        dataset_statistics=STATS_FILE,
        files={path.relative_to(root).as_posix(): file_record(path) for path in _files(root)},
        versions=_versions(),
        engines={},
    )


def _export_dit_graphs(
    request: ExportRequest,
    checkpoint: Path,
    role: str,
    platform: PlatformSpec,
    text_shape: tuple[int, ...],
    writer: _GraphWriter,
) -> dict[str, object]:
    """The DiT's text-K/V graph and one DiT graph per batch size; returns the DiT configuration. The network is
    freed before returning."""
    dit = load_dit(checkpoint, TORCH_DTYPES[request.precision])  # its weights were checked by `_write_contents`
    _, text_tokens, text_dim = text_shape
    text_kv = dit.config.text_kv_shape(text_tokens)
    writer.add(
        f"{role}_text_kv", text_kv_graph(text_tokens, text_dim, text_kv, prefix=role), partial(export_text_kv, dit)
    )
    for batch in request.batch_sizes:
        writer.add(role, dit_graph(platform, batch, text_kv, prefix=role), partial(export_dit, dit))
    config = asdict(dit.config)
    del dit
    gc.collect()  # the 2B network is 4 GB in bf16: release it before the next one is loaded
    return config


def _export_vae_graphs(request: ExportRequest, platform: PlatformSpec, writer: _GraphWriter) -> dict[str, object]:
    """The VAE's graphs; returns its configuration. The network is freed on return."""
    vae = load_wan_vae(request.tokenizer, TORCH_DTYPES[vae_graph_precision(request.precision)])
    bad = non_finite_tensors(dict(vae.state_dict()))
    _refuse_non_finite(bad, request.tokenizer, vae_graph_precision(request.precision))
    cameras = partial(export_vae_cameras_encoder, vae, platform)
    writer.add("vae_encoder_cameras", vae_encoder_graph(platform, False), cameras)
    if request.future_images:
        writer.add("vae_encoder_full", vae_encoder_graph(platform, True), partial(export_vae_encoder, vae))
        writer.add("vae_decoder", vae_decoder_graph(platform), partial(export_vae_decoder, vae))
    return asdict(vae.config)


def _refuse_non_finite(bad: list[str], path: Path, precision: str) -> None:
    """A network whose weights hold NaN or infinity (`bad`: in the file, or past the range of `precision`) answers
    every query with NaN: refused before minutes of export, rather than found once its bundle is deployed."""
    if bad:
        where = (
            "`cosmos-edge checkpoint inspect` lists those of the file"
            if precision == "fp32"
            else f"values past {precision}'s range become infinity: export in fp32, or check the file's with "
            "`cosmos-edge checkpoint inspect`"
        )
        raise CheckpointError(
            f"{path}: {len(bad)} parameter(s) hold NaN or infinity in {precision} (first: {bad[0]}); a bundle "
            f"exported from it would answer every query with NaN ({where})"
        )


def _files(root: Path) -> Iterator[Path]:
    unlisted = (MANIFEST_NAME, _WRITING_LOCK)
    return (path for path in sorted(root.rglob("*")) if path.is_file() and path.name not in unlisted)


def _versions() -> dict[str, str | None]:
    """Versions of what built the bundle; TensorRT is recorded when importable (engines are built later)."""
    versions: dict[str, str | None] = {"torch": torch.__version__, "onnx": onnx.__version__}
    distributions = {
        "cosmos_edge": ("cosmos-edge",),
        "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
        "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    }
    for name, candidates in distributions.items():
        versions[name] = next(filter(None, map(_distribution_version, candidates)), None)
    return versions


def _distribution_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
