"""A deployable bundle on disk: the manifest schema, and the reader that checks a bundle before anything runs.

Layout (written by `cosmos_edge.export.bundle_writer`, which writes into a hidden sibling and renames at the end):

    BUNDLE/
      manifest.json                  what is inside, the sha256 of every other file, versions, engines
      graphs/<graph>.onnx            one per GraphSpec: dit_text_kv, dit_b1, dit_b8, vae_encoder_cameras, ...
      graphs/<graph>.onnx.data       ONNX external data, for graphs with large weights
      text_embeddings.safetensors    instruction -> T5 embedding (`text_embeddings.write` format)
      dataset_statistics.json        the official statistics file, as given

Torch-free: serving reads bundles on machines without torch. Every problem found raises `BundleError` naming the
file and what is wrong. `Bundle.open` checks the manifest and that every listed file exists with its recorded
size; contents are hashed when a file is first used (`Bundle.file`), so a server loading batch 1 does not hash
the planning graphs. The manifest's `engines` section belongs to the TensorRT backend.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cosmos_edge.runtime.checks import is_positive_int
from cosmos_edge.runtime.engines.graph import GraphFile, GraphSpec, TensorSpec, text_kv_graph
from cosmos_edge.runtime.errors import BundleError, ConfigError
from cosmos_edge.runtime.files import graph_files_digest, sha256_file, write_atomic
from cosmos_edge.runtime.platforms import PLATFORMS, PlatformSpec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.normalization import DatasetStats
from cosmos_edge.runtime.policy.planning_config import COUNT_LIMITS
from cosmos_edge.runtime.policy.text_embeddings import TextEmbeddings
from cosmos_edge.runtime.precision import PRECISIONS, vae_graph_precision

_LOG = logging.getLogger(__name__)
_GRAPH_NAME = re.compile(r"[A-Za-z0-9_]+")

# 2: the conditioning prefix is encoded from its camera frames (`vae_encoder_cameras`); 3: the DiT graphs take the
# instruction's cross-attention keys and values, computed once per instruction by a `*_text_kv` graph.
SCHEMA_VERSION = 3
FORMAT_TAG = "cosmos-edge/bundle"
MANIFEST_NAME = "manifest.json"
ENGINES_DIR = "engines"  # engines a bundle ships: <graph>.engine + <graph>.json, listed in the manifest
CACHE_DIR = "cache"  # what backends build on first use (TensorRT engines), per backend
GRAPH_ROLES = (
    "dit",
    "dit_text_kv",
    "planning_dit",
    "planning_dit_text_kv",
    "vae_encoder_cameras",
    "vae_encoder_full",
    "vae_decoder",
)
# A DiT graph's batch is the candidates one device scores at once, so no larger than the most candidates planned.
MAX_DIT_BATCH = COUNT_LIMITS["num_queries_best_of_n"]


def check_batch_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """The DiT batch sizes of an export, sorted: distinct, in 1..MAX_DIT_BATCH, and 1 among them (the reactive mode
    runs at batch 1, so a bundle without it could not be served)."""
    valid = all(is_positive_int(b) and b <= MAX_DIT_BATCH for b in sizes)  # first: a list in a hand-edited file
    if not sizes or not valid or len(set(sizes)) != len(sizes):
        raise ConfigError(f"batch_sizes: expected distinct ints in 1..{MAX_DIT_BATCH} such as 1,8, got {list(sizes)}")
    if 1 not in sizes:
        raise ConfigError(f"batch_sizes: expected 1 among them (the reactive mode runs at batch 1), got {list(sizes)}")
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class FileRecord:
    sha256: str
    size: int


@dataclass(frozen=True)
class GraphRecord:
    """One ONNX graph: `role` in GRAPH_ROLES, `batch` its batch size, paths relative to the bundle root."""

    role: str
    batch: int
    file: str
    external_data: str | None
    spec: GraphSpec

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file,) if self.external_data is None else (self.file, self.external_data)


@dataclass(frozen=True)
class ModelRecord:
    """`dataclasses.asdict` of the DiT and VAE configurations, and the text conditioning shape [1, tokens, dim]."""

    dit: Mapping[str, Any]
    vae: Mapping[str, Any]
    planning_dit: Mapping[str, Any] | None
    text_tokens: int
    text_dim: int


@dataclass(frozen=True)
class BundleManifest:
    """Everything a bundle holds and was built with; serialised with `dataclasses.asdict`."""

    schema_version: int
    format: str
    created_utc: str
    platform: PlatformSpec
    precision: str
    batch_sizes: tuple[int, ...]
    onnx_opset: int
    model: ModelRecord
    graphs: Mapping[str, GraphRecord]
    text_embeddings: str
    dataset_statistics: str
    files: Mapping[str, FileRecord]
    versions: Mapping[str, str | None]
    engines: Mapping[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, raw: object, source: Path) -> BundleManifest:
        """Parses a manifest; the schema version is checked first so a newer bundle gets that message."""
        fields = _Fields(raw, source, "manifest")
        version = fields.get("schema_version", int)
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"{source}: schema_version {version} is newer than this cosmos-edge reads (up to {SCHEMA_VERSION}); "
                f"upgrade cosmos-edge or re-export the bundle with this version"
            )
        if 1 <= version < SCHEMA_VERSION:
            raise BundleError(
                f"{source}: schema_version {version} was written by an earlier cosmos-edge, whose graphs this "
                f"version no longer runs (it reads {SCHEMA_VERSION}); re-export the bundle with `cosmos-edge export`"
            )
        fields.require("schema_version", version >= 1, "a positive int", version)
        fields.require("format", fields.get("format", str) == FORMAT_TAG, repr(FORMAT_TAG), fields.get("format", str))
        precision = fields.get("precision", str)
        fields.require("precision", precision in PRECISIONS, f"one of {PRECISIONS}", precision)
        batch_sizes = tuple(fields.get("batch_sizes", list))
        try:
            check_batch_sizes(batch_sizes)  # as export writes them
        except ConfigError as error:
            raise BundleError(f"{source}: manifest.{error}") from None
        model = fields.child("model")
        graphs = fields.child("graphs")
        files = fields.child("files")
        engines = fields.child("engines")
        for name in graphs.names():  # engine files are named after their graph: no path may hide in a name
            graphs.require(name, _GRAPH_NAME.fullmatch(name) is not None, "a graph name of letters, digits and _", name)
        parsed_graphs = {name: _graph(graphs.child(name), name) for name in graphs.names()}
        dit_batches = sorted(record.batch for record in parsed_graphs.values() if record.role == "dit")
        fields.require("batch_sizes", dit_batches == sorted(batch_sizes), f"the dit graphs' {dit_batches}", batch_sizes)
        _check_text_kv(graphs, parsed_graphs, model.get("text_tokens", int), model.get("text_dim", int))
        for path in files.names():  # every file the reader opens is one of these, checked against its hash
            files.require(path, _is_inside(path), "a relative path inside the bundle", path)
        return cls(
            schema_version=version,
            format=FORMAT_TAG,
            created_utc=fields.get("created_utc", str),
            platform=_platform(fields.child("platform")),
            precision=precision,
            batch_sizes=batch_sizes,
            onnx_opset=fields.get("onnx_opset", int),
            model=ModelRecord(
                dit=model.get("dit", dict),
                vae=model.get("vae", dict),
                planning_dit=model.optional("planning_dit", dict),
                text_tokens=model.get("text_tokens", int),
                text_dim=model.get("text_dim", int),
            ),
            graphs=parsed_graphs,
            text_embeddings=fields.get("text_embeddings", str),
            dataset_statistics=fields.get("dataset_statistics", str),
            files={path: FileRecord(**files.child(path).pick(sha256=str, size=int)) for path in files.names()},
            versions=fields.get("versions", dict),
            engines={name: _engine(engines.child(name)) for name in engines.names()},
        )


def _engine(fields: _Fields) -> dict[str, Any]:
    """An engine the bundle ships: its file in `engines/`; the rest of the entry is the TensorRT backend's record."""
    file = fields.get("file", str)
    fields.require("file", _is_inside(file) and "/" not in file, f"a file name in {ENGINES_DIR}/", file)
    return fields.raw


def _is_inside(relative: str) -> bool:
    path = PurePosixPath(relative)
    return bool(relative) and not path.is_absolute() and ".." not in path.parts and "\\" not in relative


class _Fields:
    """Typed access to one JSON object of the manifest; errors name the file and the field path."""

    def __init__(self, raw: object, source: Path, where: str) -> None:
        if not isinstance(raw, dict):
            raise BundleError(f"{source}: {where}: expected a JSON object, got {type(raw).__name__}")
        self.raw: dict[str, Any] = raw
        self.source = source
        self.where = where

    def names(self) -> list[str]:
        return list(self.raw)

    def get(self, key: str, kind: type) -> Any:
        if key not in self.raw:
            raise BundleError(f"{self.source}: {self.where}.{key}: missing")
        value = self.raw[key]
        self.require(key, isinstance(value, kind) and not isinstance(value, bool), kind.__name__, value)
        return value

    def optional(self, key: str, kind: type) -> Any:
        return None if self.raw.get(key) is None else self.get(key, kind)

    def child(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self.source, f"{self.where}.{key}")

    def pick(self, **kinds: type) -> dict[str, Any]:
        return {key: self.get(key, kind) for key, kind in kinds.items()}

    def require(self, key: str, ok: bool, expected: str, got: object) -> None:
        if not ok:
            raise BundleError(f"{self.source}: {self.where}.{key}: expected {expected}, got {got!r:.200}")


def _platform(fields: _Fields) -> PlatformSpec:
    """The manifest's platform must be the one this code knows under that name: slot layouts may not drift."""
    name = fields.get("name", str)
    known = PLATFORMS.get(name)
    if known is None:
        raise BundleError(f"{fields.source}: {fields.where}.name: expected one of {sorted(PLATFORMS)}, got {name!r}")
    expected = json.loads(json.dumps(dataclasses.asdict(known)))
    differing = sorted(key for key in expected.keys() | fields.raw.keys() if fields.raw.get(key) != expected.get(key))
    if differing:
        raise BundleError(
            f"{fields.source}: platform {name!r} differs from this cosmos-edge's definition in {differing}; "
            f"re-export the bundle with this version"
        )
    return known


def _graph(fields: _Fields, name: str) -> GraphRecord:
    role = fields.get("role", str)
    fields.require("role", role in GRAPH_ROLES, f"one of {GRAPH_ROLES}", role)
    spec = fields.child("spec")

    def tensors(key: str) -> tuple[TensorSpec, ...]:
        entries = [_Fields(entry, spec.source, f"{spec.where}.{key}") for entry in spec.get(key, list)]
        for entry in entries:
            shape = entry.get("shape", list)
            entry.require("shape", all(is_positive_int(size) for size in shape), "positive ints", shape)
            dtype = entry.get("dtype", str)  # every graph is float32 at its boundary, whatever it computes in
            entry.require("dtype", dtype == "float32", "float32", dtype)
        return tuple(
            TensorSpec(entry.get("name", str), tuple(entry.get("shape", list)), entry.get("dtype", str))
            for entry in entries
        )

    record = GraphRecord(
        role=role,
        batch=fields.get("batch", int),
        file=fields.get("file", str),
        external_data=fields.optional("external_data", str),
        spec=GraphSpec(spec.get("name", str), tensors("inputs"), tensors("outputs")),
    )
    fields.require("spec.name", record.spec.name == name, f"the graph's name {name!r}", record.spec.name)
    leading = record.spec.inputs[0].shape[0] if record.spec.inputs and record.spec.inputs[0].shape else None
    fields.require("batch", record.batch == leading, f"its spec's batch {leading}", record.batch)
    return record


def _check_text_kv(graphs: _Fields, parsed: Mapping[str, GraphRecord], text_tokens: int, text_dim: int) -> None:
    """Each DiT role has one text-K/V graph, from the model's text embedding to keys and values, and its DiT graphs
    take those as their last inputs."""
    for role in ("dit", "planning_dit"):
        text_kv = [name for name, record in parsed.items() if record.role == f"{role}_text_kv"]
        dits = [name for name, record in parsed.items() if record.role == role]
        if not dits and not text_kv:
            continue
        if len(text_kv) != 1:
            raise BundleError(f"{graphs.source}: {graphs.where}: expected one {role}_text_kv graph, got {text_kv}")
        spec = parsed[text_kv[0]].spec
        outputs = spec.outputs
        kv_shape = outputs[0].shape if outputs else ()
        expected = text_kv_graph(text_tokens, text_dim, kv_shape, prefix=role)
        graphs.require(f"{text_kv[0]}.spec", spec == expected, f"{expected}", spec)
        for name in dits:
            inputs = parsed[name].spec.inputs[3:]
            graphs.require(f"{name}.spec.inputs", inputs == outputs, f"{text_kv[0]}'s outputs last", inputs)


def file_record(path: Path) -> FileRecord:
    return FileRecord(sha256=sha256_file(path), size=path.stat().st_size)


def write_manifest(root: Path, manifest: BundleManifest) -> None:
    """Writes `root/manifest.json` atomically, so a reader never sees half of it."""
    write_atomic(root / MANIFEST_NAME, manifest.to_json().encode())


class Bundle:
    """An opened bundle: manifest parsed, every listed file present with its recorded size.

    Use `Bundle.open`. File contents are checked against their sha256 on first use through `file()`.
    """

    def __init__(self, root: Path, manifest: BundleManifest) -> None:
        self.root = root
        self.manifest = manifest
        self._verified: set[str] = set()

    @classmethod
    def open(cls, root: str | Path) -> Bundle:
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        if not root.exists():
            raise BundleError(f"{root}: no such bundle directory")
        if not root.is_dir():
            raise BundleError(f"{root}: is a file; a bundle is the directory `cosmos-edge export` writes")
        if not manifest_path.is_file():
            raise BundleError(
                f"{manifest_path}: missing; {root} is not a complete bundle (an interrupted export leaves none)"
            )
        try:
            raw = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise BundleError(f"{manifest_path}: cannot read the manifest: {error}") from error
        bundle = cls(root, BundleManifest.from_json(raw, manifest_path))
        bundle._check_listing()
        return bundle

    def file(self, relative: str) -> Path:
        """The absolute path of a listed file, after checking its sha256 (once per Bundle)."""
        path = self.present(relative)
        record = self.manifest.files[relative]
        if relative not in self._verified:
            try:
                digest = sha256_file(path)
            except OSError as error:
                raise BundleError(f"{path}: cannot read it ({error.strerror or error})") from None
            if digest != record.sha256:
                raise BundleError(
                    f"{path}: sha256 mismatch: {MANIFEST_NAME} records {record.sha256[:16]}…, the file has "
                    f"{digest[:16]}…; the file was modified or corrupted, {_remedy(relative)}"
                )
            self._verified.add(relative)
        return path

    def present(self, relative: str) -> Path:
        """The absolute path of a listed file that is there, unhashed: for files something else verifies."""
        if relative not in self.manifest.files:
            raise BundleError(f"{self.root / MANIFEST_NAME}: lists no file {relative!r}")
        path = self.root / relative
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST_NAME}); {_remedy(relative)}")
        return path

    def graph(self, name: str) -> GraphRecord:
        record = self.manifest.graphs.get(name)
        if record is None:
            raise BundleError(f"bundle {self.root}: has no graph {name!r}; it has {sorted(self.manifest.graphs)}")
        return record

    def graph_file(self, name: str, *, with_engine: bool = False) -> GraphFile:
        """What a backend opens for graph `name`: its files verified, or (`with_engine`: for a backend that runs
        engines, TensorRT) the engine the bundle ships for it, which is then what runs instead of the ONNX files.

        An engine's record beside it (which GPU and TensorRT it runs on, and its sha256) is verified against the
        manifest; the engine's bytes against the record as the backend reads them (`tensorrt.cache.read_engine`),
        and the ONNX files, which a backend with an engine never reads, are not hashed: a 2B graph's are GBs."""
        record = self.graph(name)
        entry = self.manifest.engines.get(name) if with_engine else None
        engine = None
        if entry is None:
            onnx, *external = [self.file(relative) for relative in record.files]
        else:
            onnx, *external = [self.present(relative) for relative in record.files]
            engine_file = f"{ENGINES_DIR}/{entry['file']}"
            record_file = f"{ENGINES_DIR}/{PurePosixPath(entry['file']).with_suffix('.json')}"
            if record_file not in self.manifest.files:  # the record vouches for the engine's bytes
                raise BundleError(
                    f"{self.root / MANIFEST_NAME}: lists engine {engine_file} without its record {record_file}; "
                    f"{_remedy(engine_file)}"
                )
            self.file(record_file)
            engine = self.present(engine_file)
        # From the hashes just verified: a TensorRT backend need not read the graph's GBs again.
        digest = graph_files_digest(
            (PurePosixPath(relative).name, self.manifest.files[relative].sha256) for relative in record.files
        )
        precision = self.manifest.precision
        return GraphFile(
            record.spec,
            onnx,
            tuple(external),
            vae_graph_precision(precision) if record.role.startswith("vae") else precision,
            engine,
            cache_dir=self.root / CACHE_DIR,
            onnx_sha256=digest,
        )

    def graph_names(self, role: str) -> list[str]:
        return sorted(name for name, record in self.manifest.graphs.items() if record.role == role)

    def dit_graph_name(self, batch: int, role: str = "dit") -> str:
        """The DiT graph of `role` ("dit" or "planning_dit") for `batch` candidates."""
        batches = sorted(self.manifest.graphs[name].batch for name in self.graph_names(role))
        for name in self.graph_names(role):
            if self.manifest.graphs[name].batch == batch:
                return name
        if not batches:
            hint = "export it with --planning-checkpoint" if role == "planning_dit" else "re-export it"
            raise BundleError(f"bundle {self.root}: its manifest lists no {role} graphs ({hint})")
        raise BundleError(
            f"bundle {self.root}: has no {role} graph for batch size {batch}; it has batch sizes {batches} "
            f"(re-export with --batch-sizes)"
        )

    def text_kv_graph_name(self, role: str = "dit") -> str:
        """The graph computing the cross-attention keys and values the DiT graphs of `role` take (a manifest holds
        exactly one for each DiT role it has: `_check_text_kv`)."""
        (name,) = self.graph_names(f"{role}_text_kv")
        return name

    def check_platform(self, platform: str | None) -> None:
        """Refuses a bundle built for another platform than `platform` (None accepts the bundle's own)."""
        built_for = self.manifest.platform.name
        if platform is not None and platform != built_for:
            raise BundleError(f"bundle {self.root}: built for platform {built_for!r}, asked for {platform!r}")

    def text_embeddings(self) -> TextEmbeddings:
        return text_store.read(self.file(self.manifest.text_embeddings))

    def dataset_stats(self) -> DatasetStats:
        return DatasetStats.from_json(self.file(self.manifest.dataset_statistics), self.manifest.platform)

    def _check_listing(self) -> None:
        """Cheap completeness check: every listed file exists with its size, and every graph's files are listed.
        Prebuilt engines are checked when a backend uses them (`file`): a bundle that lost one still opens for
        onnxruntime, and for `engines build`, which builds it again."""
        manifest_path = self.root / MANIFEST_NAME
        for relative, record in self.manifest.files.items():
            if relative.startswith(f"{ENGINES_DIR}/"):
                continue
            path = self.root / relative
            if not path.is_file():
                raise BundleError(f"{path}: missing from the bundle (listed in {MANIFEST_NAME}); re-export the bundle")
            size = path.stat().st_size
            if size != record.size:
                raise BundleError(
                    f"{path}: size {size} bytes, {MANIFEST_NAME} records {record.size}; the file was modified or "
                    f"truncated, re-export the bundle"
                )
        referenced = [file for graph in self.manifest.graphs.values() for file in graph.files]
        referenced += [self.manifest.text_embeddings, self.manifest.dataset_statistics]
        unlisted = sorted(set(referenced) - set(self.manifest.files))
        if unlisted:
            raise BundleError(f"{manifest_path}: files {unlisted} are used but have no sha256 record")


def _remedy(relative: str) -> str:
    """What rebuilds a bundle file: its engines are built by `engines build`, everything else by `export`."""
    if relative.startswith(f"{ENGINES_DIR}/"):
        return "build the bundle's engines again (cosmos-edge engines build BUNDLE)"
    return "re-export the bundle"
