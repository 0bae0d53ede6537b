"""Bad bundles: each problem is a BundleError or EngineError naming the file and what is wrong."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cosmos_edge.runtime.bundle import manifest as manifest_module
from cosmos_edge.runtime.bundle.loader import load_policies, source_platform
from cosmos_edge.runtime.bundle.manifest import Bundle
from cosmos_edge.runtime.bundle.sources import BundleSource
from cosmos_edge.runtime.engines.registry import is_installed, load_graph_backend
from cosmos_edge.runtime.errors import BundleError, ConfigError, EngineError
from cosmos_edge.runtime.policy.planning_config import PlanningConfig
from tests.helpers.observations import TinyBundles
from tests.helpers.policies import bundle_policy


@pytest.fixture
def bundle_copy(tiny_bundles: TinyBundles, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundles("aloha"), tmp_path / "bundle"))


def edit_manifest(root: Path, edit: Callable[[dict], None]) -> None:
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def test_a_bundle_that_lost_an_engine_opens_and_names_the_command_that_builds_it(bundle_copy: Path) -> None:
    def list_a_lost_engine(manifest: dict) -> None:  # an engines build whose file a copy left behind
        manifest["engines"]["dit_b1"] = {"file": "dit_b1.engine"}
        manifest["files"]["engines/dit_b1.engine"] = {"sha256": "0" * 64, "size": 123}

    edit_manifest(bundle_copy, list_a_lost_engine)
    bundle = Bundle.open(bundle_copy)  # for onnxruntime, and for `engines build`, which would build it again
    assert bundle.file("graphs/dit_b1.onnx").is_file()
    with pytest.raises(BundleError, match=r"dit_b1\.engine: missing from the bundle .*cosmos-edge engines build"):
        bundle.file("engines/dit_b1.engine")


def test_an_engine_listed_without_its_record_is_refused(bundle_copy: Path) -> None:
    engines = bundle_copy / "engines"
    engines.mkdir()
    (engines / "dit_b1.engine").write_bytes(b"an engine")

    def ship_the_engine_alone(manifest: dict) -> None:
        manifest["engines"]["dit_b1"] = {"file": "dit_b1.engine"}
        record = manifest_module.file_record(engines / "dit_b1.engine")
        manifest["files"]["engines/dit_b1.engine"] = {"sha256": record.sha256, "size": record.size}

    edit_manifest(bundle_copy, ship_the_engine_alone)
    with pytest.raises(BundleError, match=r"engines/dit_b1\.engine without its record engines/dit_b1\.json; build"):
        Bundle.open(bundle_copy).graph_file("dit_b1", with_engine=True)


def test_a_shipped_engine_is_vouched_for_by_its_record_and_its_onnx_is_not_hashed(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prebuilt engine is what runs: the manifest verifies its record, the record its bytes as the backend reads
    them (`read_engine`); hashing the ONNX files (GBs for the 2B DiT) and the engine here would be wasted."""
    engines = bundle_copy / "engines"
    engines.mkdir()
    (engines / "dit_b1.engine").write_bytes(b"an engine")
    (engines / "dit_b1.json").write_text('{"sha256": "of the engine"}')

    def ship_the_engine(manifest: dict) -> None:
        manifest["engines"]["dit_b1"] = {"file": "dit_b1.engine"}
        for name in ("dit_b1.engine", "dit_b1.json"):
            record = manifest_module.file_record(engines / name)
            manifest["files"][f"engines/{name}"] = {"sha256": record.sha256, "size": record.size}

    edit_manifest(bundle_copy, ship_the_engine)
    hashed: list[str] = []
    sha256_file = manifest_module.sha256_file
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path.name) or sha256_file(path))
    bundle = Bundle.open(bundle_copy)
    graph = bundle.graph_file("dit_b1", with_engine=True)
    assert graph.engine == engines / "dit_b1.engine" and hashed == ["dit_b1.json"]
    bundle.graph_file("dit_b1", with_engine=False)  # a backend that runs the ONNX: its files are verified
    assert hashed == ["dit_b1.json", "dit_b1.onnx"]
    (engines / "dit_b1.json").write_text('{"sha256": "of another engine"}')
    with pytest.raises(BundleError, match=r"dit_b1\.json: sha256 mismatch"):
        Bundle.open(bundle_copy).graph_file("dit_b1", with_engine=True)


def test_a_good_bundle_opens_and_verifies(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    for relative in bundle.manifest.files:  # every listed file against its sha256
        bundle.file(relative)
    assert bundle.dit_graph_name(2) == "dit_b2" and bundle.dataset_stats().action_dim == 14


def test_missing_file_is_named(bundle_copy: Path) -> None:
    (bundle_copy / "graphs" / "dit_b1.onnx").unlink()
    with pytest.raises(BundleError, match=r"graphs/dit_b1\.onnx: missing"):
        bundle_policy(bundle_copy)


def test_missing_manifest_is_not_a_bundle(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json: missing; .* not a complete bundle"):
        bundle_policy(bundle_copy)


def test_hash_mismatch_is_named(bundle_copy: Path) -> None:
    path = bundle_copy / "text_embeddings.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"text_embeddings\.safetensors: sha256 mismatch"):
        bundle_policy(bundle_copy)


def test_truncated_file_is_named_on_open(bundle_copy: Path) -> None:
    path = bundle_copy / "graphs" / "vae_encoder_cameras.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BundleError, match=r"vae_encoder_cameras\.onnx: size 100 bytes"):
        Bundle.open(bundle_copy)


def test_newer_schema_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest.update(schema_version=99))
    with pytest.raises(BundleError, match="schema_version 99 is newer than this cosmos-edge reads"):
        bundle_policy(bundle_copy)


@pytest.mark.parametrize("version", [1, manifest_module.SCHEMA_VERSION - 1])
def test_a_bundle_of_an_earlier_schema_asks_for_a_re_export(bundle_copy: Path, version: int) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest.update(schema_version=version))
    with pytest.raises(
        BundleError, match=rf"schema_version {version} was written by an earlier cosmos-edge.*cosmos-edge export"
    ):
        bundle_policy(bundle_copy)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["graphs"]["dit_b1"].update(batch="one"), r"manifest\.graphs\.dit_b1\.batch: expected int"),
        (
            lambda m: m["graphs"]["dit_b2"].update(batch=4),
            r"manifest\.graphs\.dit_b2\.batch: expected its spec's batch 2, got 4",
        ),
        (lambda m: m.update(batch_sizes=[7]), r"manifest\.batch_sizes: expected 1 among them"),
        (lambda m: m.update(batch_sizes=[1, 4]), r"manifest\.batch_sizes: expected the dit graphs' \[1, 2\]"),
        (
            lambda m: m["graphs"]["dit_b1"]["spec"]["inputs"][0].update(shape=["a", 2]),
            r"manifest\.graphs\.dit_b1\.spec\.inputs\.shape: expected positive ints, got \['a', 2\]",
        ),
        (
            lambda m: m["graphs"]["dit_b1"]["spec"]["outputs"][0].update(dtype="bfloat16"),
            r"manifest\.graphs\.dit_b1\.spec\.outputs\.dtype: expected float32, got 'bfloat16'",
        ),
        (lambda m: m.update(batch_sizes=[[1]]), r"manifest\.batch_sizes: expected distinct ints"),
        (
            lambda m: m["graphs"].update({"../x": m["graphs"]["vae_encoder_cameras"]}),
            r"manifest\.graphs\.\.\./x: expected a graph name of letters, digits and _",
        ),
        (
            lambda m: m["graphs"]["dit_b1"]["spec"].update(name="dit_b2"),
            r"manifest\.graphs\.dit_b1\.spec\.name: expected the graph's name 'dit_b1', got 'dit_b2'",
        ),
    ],
    ids=[
        "batch not an int",
        "batch against spec",
        "no batch 1",
        "batch sizes against graphs",
        "shape not ints",
        "dtype not float32",
        "a list among the batch sizes",
        "a graph name that is a path",
        "a spec named after another graph",
    ],
)
def test_malformed_manifest_names_the_field(
    bundle_copy: Path, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=rf"manifest.json: {message}"):
        Bundle.open(bundle_copy)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"fused_attention_count": 1}, r"manifest\.engines\.dit_b1\.file: missing"),
        ("dit_b1.engine", r"manifest\.engines\.dit_b1: expected dict, got 'dit_b1\.engine'"),
        ({"file": "../dit_b1.engine"}, r"manifest\.engines\.dit_b1\.file: expected a file name in engines/"),
    ],
    ids=["no file", "not an object", "outside engines/"],
)
def test_malformed_engine_entries_name_the_field(bundle_copy: Path, entry: object, message: str) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest["engines"].update(dit_b1=entry))
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_copy)


def test_a_manifest_that_describes_another_graph_than_its_file_is_the_bundles_fault(bundle_copy: Path) -> None:
    def widen_the_first_input(manifest: dict) -> None:  # edited by hand, or a file swapped for another export's
        manifest["graphs"]["dit_b1"]["spec"]["inputs"][0]["shape"][2] += 1

    edit_manifest(bundle_copy, widen_the_first_input)
    with pytest.raises(BundleError, match=r"manifest\.json: graph 'dit_b1' is not the file's graph: .*dit_b1\.onnx"):
        bundle_policy(bundle_copy)


def test_drifted_platform_definition_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest["platform"].update(chunk_size=64))
    with pytest.raises(BundleError, match=r"platform 'aloha' differs .* \['chunk_size'\]"):
        Bundle.open(bundle_copy)


def test_other_platform_is_refused(tiny_bundles: TinyBundles) -> None:
    with pytest.raises(BundleError, match="built for platform 'aloha', asked for 'libero'"):
        bundle_policy(tiny_bundles("aloha"), platform="libero")
    # Also by what commands read before loading (the observation is checked against the bundle's platform).
    with pytest.raises(BundleError, match="built for platform 'aloha', asked for 'libero'"):
        source_platform(BundleSource(tiny_bundles("aloha"), platform="libero"))


def test_missing_batch_size_is_refused(tiny_bundles: TinyBundles) -> None:
    with pytest.raises(BundleError, match=r"no dit graph for batch size 8; it has batch sizes \[1, 2\]"):
        load_policies(BundleSource(tiny_bundles("aloha")), planning=PlanningConfig(num_queries_best_of_n=8))


def test_missing_planning_graphs_are_refused(tiny_bundles: TinyBundles) -> None:
    with pytest.raises(BundleError, match="no planning_dit graphs"):
        Bundle.open(tiny_bundles("aloha")).dit_graph_name(1, "planning_dit")


def test_a_bundle_without_its_text_kv_graph_is_refused_before_loading(bundle_copy: Path) -> None:
    def drop_text_kv(manifest: dict[str, Any]) -> None:
        record = manifest["graphs"].pop("dit_text_kv")
        del manifest["files"][record["file"]]
        (bundle_copy / record["file"]).unlink()

    edit_manifest(bundle_copy, drop_text_kv)
    with pytest.raises(
        BundleError, match=r"manifest\.json: manifest\.graphs: expected one dit_text_kv graph, got \[\]"
    ):
        Bundle.open(bundle_copy)


def test_a_text_kv_graph_without_its_two_outputs_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest["graphs"]["dit_text_kv"]["spec"]["outputs"].pop())
    with pytest.raises(
        BundleError, match=r"manifest\.graphs\.dit_text_kv\.spec: expected GraphSpec\(name='dit_text_kv'"
    ):
        Bundle.open(bundle_copy)


def test_dit_graphs_taking_other_keys_and_values_than_the_text_kv_graph_gives_are_refused(bundle_copy: Path) -> None:
    def fewer_tokens(manifest: dict[str, Any]) -> None:
        for tensor in manifest["graphs"]["dit_b2"]["spec"]["inputs"][3:]:
            tensor["shape"][3] -= 1

    edit_manifest(bundle_copy, fewer_tokens)
    with pytest.raises(
        BundleError, match=r"manifest\.graphs\.dit_b2\.spec\.inputs: expected dit_text_kv's outputs last"
    ):
        Bundle.open(bundle_copy)


def test_missing_future_image_graphs_are_refused_when_required(tiny_bundles: TinyBundles) -> None:
    with pytest.raises(BundleError, match="no future-image graphs"):
        bundle_policy(tiny_bundles("aloha"), future_images=True)


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"expected one of \['onnxruntime', 'tensorrt'\], got 'openvino'"):
        load_graph_backend("openvino")


@pytest.mark.skipif(is_installed("tensorrt"), reason="TensorRT is installed here")
def test_backend_not_installed(tiny_bundles: TinyBundles) -> None:
    with pytest.raises(EngineError, match="backend 'tensorrt' is not installed: cannot import 'tensorrt'"):
        bundle_policy(tiny_bundles("aloha"), backend="tensorrt")


def test_onnxruntime_not_installed(tiny_bundles: TinyBundles) -> None:
    script = (
        "import sys\n"
        "sys.modules['onnxruntime'] = None  # as if not installed\n"
        "from cosmos_edge.runtime.bundle.loader import load_policies\n"
        "from cosmos_edge.runtime.bundle.sources import BundleSource\n"
        "from cosmos_edge.runtime.errors import EngineError\n"
        "try:\n"
        "    load_policies(BundleSource(sys.argv[1]))\n"
        "except EngineError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tiny_bundles("aloha"))], capture_output=True, text=True, check=True
    )
    assert "backend 'onnxruntime' is not installed: cannot import 'onnxruntime'" in result.stdout, result.stderr


def test_bf16_bundle_on_the_cpu_provider_says_what_to_use_before_loading_anything(
    bundle_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    edit_manifest(bundle_copy, lambda manifest: manifest.update(precision="bf16"))
    hashed: list[Path] = []
    monkeypatch.setattr(manifest_module, "sha256_file", lambda path: hashed.append(path) or "0" * 64)
    with pytest.raises(ConfigError, match=r"device: 'cpu' cannot run a bf16 bundle \(exported for CUDA\)"):
        bundle_policy(bundle_copy)
    assert not [path for path in hashed if path.suffix == ".onnx"]  # no graph hashed (nor loaded) first


def test_paths_outside_the_bundle_are_refused(bundle_copy: Path) -> None:
    def escape(manifest: dict) -> None:
        manifest["files"]["../outside.json"] = manifest["files"].pop("dataset_statistics.json")
        manifest["dataset_statistics"] = "../outside.json"

    edit_manifest(bundle_copy, escape)
    with pytest.raises(BundleError, match=r"manifest\.files\.\.\./outside\.json: expected a relative path inside"):
        Bundle.open(bundle_copy)


def test_an_unreadable_file_is_named(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(manifest_module, "sha256_file", refuse)
    with pytest.raises(BundleError, match=r"dataset_statistics\.json: cannot read it \(Permission denied\)"):
        Bundle.open(bundle_copy).file("dataset_statistics.json")
