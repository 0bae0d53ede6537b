"""The bundle a tiny export writes: a manifest that describes every file, and nothing complete-looking when the
export is interrupted."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cosmos_edge.export import bundle_writer
from cosmos_edge.export.bundle_writer import ExportRequest, export_bundle, prepare_bundle_path
from cosmos_edge.runtime.bundle.manifest import SCHEMA_VERSION, Bundle
from cosmos_edge.runtime.engines.graph import dit_graph, text_kv_graph, vae_encoder_graph
from cosmos_edge.runtime.errors import BundleError, CheckpointError, ConfigError, EngineError
from cosmos_edge.runtime.files import CheckpointFiles, sha256_file, write_atomic
from cosmos_edge.runtime.models.dit_config import dit_config
from cosmos_edge.runtime.platforms import platform_spec
from cosmos_edge.runtime.policy import text_embeddings as text_store
from cosmos_edge.runtime.policy.text_embeddings import TEXT_TOKENS
from tests.helpers.locks import held_elsewhere
from tests.helpers.observations import TinyBundles


def request(files: CheckpointFiles, out: Path, **overrides: object) -> ExportRequest:
    fields: dict[str, object] = {
        "checkpoint": files.checkpoint,
        "tokenizer": files.tokenizer,
        "stats": files.stats,
        "text_embeddings": files.text_embeddings,
        "platform": files.platform,
        "out": out,
        "batch_sizes": (1,),
        "precision": "fp32",
        "future_images": False,
    }
    return ExportRequest(**{**fields, **overrides})  # type: ignore[arg-type]


def test_manifest_describes_every_file(tiny_bundles: TinyBundles, tiny_assets: dict[str, CheckpointFiles]) -> None:
    root = tiny_bundles("aloha")
    raw = json.loads((root / "manifest.json").read_text())
    manifest = Bundle.open(root).manifest
    platform = platform_spec("aloha")
    assert raw["schema_version"] == SCHEMA_VERSION and manifest.platform == platform
    assert (manifest.precision, manifest.batch_sizes, manifest.onnx_opset) == ("fp32", (1, 2), 17)
    assert manifest.model.dit == json.loads(json.dumps(raw["model"]["dit"])) and manifest.model.dit["num_blocks"] == 2
    assert (manifest.model.text_tokens, manifest.model.text_dim) == (TEXT_TOKENS, dit_config("tiny").text_dim)
    text_kv = dit_config("tiny").text_kv_shape(TEXT_TOKENS)
    assert manifest.graphs["dit_text_kv"].spec == text_kv_graph(TEXT_TOKENS, dit_config("tiny").text_dim, text_kv)
    assert manifest.graphs["dit_b2"].spec == dit_graph(platform, 2, text_kv)
    assert manifest.graphs["vae_encoder_cameras"].spec == vae_encoder_graph(platform, full_sequence=False)
    # Exported without future images.
    assert sorted(manifest.graphs) == ["dit_b1", "dit_b2", "dit_text_kv", "vae_encoder_cameras"]
    on_disk = sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())
    assert sorted(manifest.files) == [name for name in on_disk if name != "manifest.json"]
    assert all(sha256_file(root / name) == record.sha256 for name, record in manifest.files.items())
    assert {"torch", "onnx", "onnxruntime", "tensorrt"} <= set(manifest.versions) and manifest.engines == {}
    source = text_store.read(tiny_assets["aloha"].text_embeddings)
    copied = Bundle.open(root).text_embeddings()
    assert copied.instructions == source.instructions
    assert all((copied.get(text) == source.get(text)).all() for text in source.instructions)


def test_a_bf16_bundle_holds_graphs_onnx_runtime_can_load(tiny_bundles: TinyBundles) -> None:
    """Opset 17 has no bfloat16 Conv: the VAE graphs compute in float32, the DiT in bfloat16; every graph passes the
    checker's full (type-inferring) check, and the VAE graphs load and run on ONNX Runtime's CPU provider."""
    root = tiny_bundles("aloha", precision="bf16", future_images=True, batch_sizes=(1,))
    manifest = Bundle.open(root).manifest
    assert manifest.precision == "bf16"
    for name, record in manifest.graphs.items():
        path = root / record.file
        onnx.checker.check_model(str(path), full_check=True)
        weights = {initializer.data_type for initializer in onnx.load(str(path)).graph.initializer}
        assert (onnx.TensorProto.BFLOAT16 in weights) == name.startswith("dit"), (name, weights)
        if name.startswith("vae"):
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {value.name: np.zeros(value.shape, np.float32) for value in session.get_inputs()}
            assert all(np.isfinite(output).all() for output in session.run(None, feeds))


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_export_leaves_no_bundle(
    interrupt: type[BaseException],
    tiny_assets: dict[str, CheckpointFiles],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fail(*args: object) -> None:
        raise interrupt("stopped while exporting the VAE")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", fail)  # after the DiT graphs are written
    out = tmp_path / "bundle"
    with pytest.raises(interrupt):
        export_bundle(request(tiny_assets["libero"], out))
    assert list(tmp_path.iterdir()) == []  # neither the bundle nor its staging directory


def test_a_full_disk_is_one_engine_error_and_leaves_nothing(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", full)
    out = tmp_path / "bundle"
    with pytest.raises(EngineError, match=rf"^{re.escape(str(out))}: writing the bundle failed \(No space left on "):
        export_bundle(request(tiny_assets["libero"], out))
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    monkeypatch.setattr("cosmos_edge.runtime.bundle.manifest.write_atomic", lambda path, data: write_atomic_full(path))
    with pytest.raises(EngineError, match=rf"^{re.escape(str(out))}: writing the bundle failed \(.*manifest\.json: "):
        export_bundle(request(tiny_assets["libero"], out))
    assert list(tmp_path.iterdir()) == []


def write_atomic_full(path: Path) -> None:
    """`write_atomic` on a full disk."""
    raise EngineError(f"{path}: cannot be written (No space left on device)")


def test_an_atomic_write_that_fails_names_its_file_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: Path, data: bytes) -> int:
        Path.write_text(self, "part of it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(EngineError, match=r"engine\.plan: cannot be written \(No space left on device\)"):
        write_atomic(tmp_path / "engine.plan", b"gigabytes")
    assert list(tmp_path.iterdir()) == []


def test_killed_export_leaves_only_a_hidden_directory_the_reader_refuses(tmp_path: Path) -> None:
    # A hard kill cannot clean up: what remains is the hidden staging directory, still without its manifest.
    staging = tmp_path / ".bundle.partial-x"
    staging.mkdir()
    (staging / "graphs").mkdir()
    with pytest.raises(BundleError, match=r"manifest\.json: missing"):
        Bundle.open(staging)


def test_a_new_export_removes_what_a_killed_one_left_but_not_a_running_ones(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Named as mkdtemp names them; the pid of a killed export may already be another process's (this one's here).
    killed = tmp_path / f".bundle.partial-{os.getpid()}-abcd1234"
    running = tmp_path / ".bundle.partial-1-efgh_567"
    starting = tmp_path / ".bundle.partial-2-ijkl_890"  # made a moment ago: its export may not hold its lock yet
    users = tmp_path / ".bundle.partial-mine"  # not an export's: never removed
    for staging in (killed, running, starting, users):
        (staging / "graphs").mkdir(parents=True)
    for staging in (killed, running):
        os.utime(staging, (time.time() - 3600, time.time() - 3600))

    def fail(*args: object) -> None:
        raise RuntimeError("x")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", fail)
    with held_elsewhere(running / ".export.lock"), pytest.raises(RuntimeError, match=r"^x$"):
        export_bundle(request(tiny_assets["libero"], tmp_path / "bundle"))
    assert sorted(tmp_path.iterdir()) == sorted([running, starting, users])


@pytest.mark.parametrize("name", ["bundle", "b[12]*"])  # glob's characters are a name's like any other
def test_a_refused_destination_still_loses_what_a_killed_export_to_it_left(tmp_path: Path, name: str) -> None:
    killed = tmp_path / f".{name}.partial-{os.getpid()}-abcd1234"
    (killed / "graphs").mkdir(parents=True)
    os.utime(killed, (time.time() - 3600, time.time() - 3600))
    (tmp_path / name).mkdir()
    (tmp_path / name / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match=f"{re.escape(name)}: already exists"):
        prepare_bundle_path(tmp_path / name)  # what `export` checks before it loads anything
    assert not killed.exists()


def test_the_current_directory_is_refused_before_anything_is_exported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # empty, but a bundle renamed over it would leave the process in a removed directory
    with pytest.raises(BundleError, match="the current directory cannot become the bundle"):
        prepare_bundle_path(Path("."))
    assert prepare_bundle_path(Path("sub/../bundle")) == tmp_path / "bundle"


def test_the_bundle_directory_is_as_readable_as_its_files(tiny_bundles: TinyBundles) -> None:
    root = tiny_bundles("libero")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((root / "manifest.json").stat().st_mode) == 0o666 & ~umask


def test_export_refuses_an_existing_destination(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "model.pt").write_bytes(b"x")
    with pytest.raises(BundleError, match="existing: already exists and is not an empty directory"):
        export_bundle(request(tiny_assets["libero"], existing))
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="dangling: already exists"):
        export_bundle(request(tiny_assets["libero"], dangling))
    # A directory made at --out and filled during the export is not replaced by the bundle.
    late = tmp_path / "late"
    export_vae = bundle_writer.export_vae_cameras_encoder

    def make_it_meanwhile(*args: object) -> object:
        late.mkdir()
        (late / "notes.txt").write_text("mine")
        return export_vae(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", make_it_meanwhile)
    with pytest.raises(BundleError, match="late: already exists and is not an empty directory"):
        export_bundle(request(tiny_assets["libero"], late))
    assert list(late.iterdir()) == [late / "notes.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dangling", "existing", "late"]


def test_an_empty_directory_becomes_the_bundle_and_one_dit_file_is_exported_once(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = tiny_assets["libero"]
    (tmp_path / "bundle").mkdir()  # made for it, as `demo --out` accepts
    bundle = export_bundle(request(files, tmp_path / "bundle", planning_checkpoint=files.checkpoint))
    roles = {record.role for record in bundle.manifest.graphs.values()}
    assert "dit" in roles and "planning_dit" not in roles  # it plans with the policy's graphs
    assert bundle.manifest.model.planning_dit is None
    assert "is the policy's: the bundle plans with the policy's DiT graphs" in caplog.text


def test_a_checkpoint_that_is_no_dit_is_refused_before_any_graph_is_exported(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def exported(*args: object) -> None:
        raise AssertionError("a graph was exported before the checkpoints were checked")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", exported)
    files = tiny_assets["libero"]
    for swapped in ({"checkpoint": files.tokenizer}, {"planning_checkpoint": files.tokenizer}):
        with pytest.raises(CheckpointError, match="not a Cosmos-Predict2 DiT checkpoint"):
            export_bundle(request(files, tmp_path / "bundle", **swapped))
        assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precision": "int8"}, "precision"),
        ({"batch_sizes": (1, 1)}, "batch_sizes"),
        ({"batch_sizes": (0,)}, "batch_sizes"),
        ({"platform": "franka"}, "platform"),
        ({"planning_checkpoint": Path("/nonexistent/planning.pt")}, "planning_checkpoint"),
    ],
)
def test_bad_requests_name_the_field(
    overrides: dict[str, object], message: str, tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=message):
        request(tiny_assets["libero"], tmp_path / "bundle", **overrides)


def test_statistics_of_another_platform_are_refused_before_exporting(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="aloha"):
        export_bundle(request(tiny_assets["aloha"], tmp_path / "bundle", stats=tiny_assets["libero"].stats))
    assert list(tmp_path.iterdir()) == []


def test_text_embeddings_not_padded_to_512_tokens_are_refused_before_exporting(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path
) -> None:
    files = tiny_assets["aloha"]
    width = text_store.read(files.text_embeddings).shape[-1]
    short = tmp_path / "short.safetensors"
    text_store.write(short, {"fold the t-shirt": np.zeros((1, 77, width), np.float32)})
    with pytest.raises(ConfigError, match=f"{short}: 77 tokens per instruction, expected 512"):
        export_bundle(request(files, tmp_path / "bundle", text_embeddings=short))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["short.safetensors"]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ((2, 8), "expected 1 among them (the reactive mode runs at batch 1)"),
        ((1, 100_000), "expected distinct ints in 1..64"),
        ((1, 1), "expected distinct ints in 1..64"),
        (([1],), "expected distinct ints in 1..64"),  # a list in a hand-edited manifest
    ],
)
def test_a_request_for_batch_sizes_nothing_could_serve_is_refused(
    tmp_path: Path, sizes: tuple[int, ...], expected: str
) -> None:
    missing = tmp_path / "not_read"  # the batch sizes are refused before any file is looked at
    with pytest.raises(ConfigError, match=f"batch_sizes: {re.escape(expected)}"):
        ExportRequest(missing, missing, missing, missing, "aloha", tmp_path / "b", batch_sizes=sizes)


@pytest.mark.parametrize("role", ["checkpoint", "planning_checkpoint"])
def test_weights_holding_nan_are_refused_before_any_graph_and_leave_no_bundle(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, role: str
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("exported a graph before refusing the weights")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", never)
    files = tiny_assets["libero"]
    state = torch.load(files.checkpoint, weights_only=True)
    key = "net.final_layer.linear.weight"
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    out = tmp_path / "bundle"
    named = r"nan\.pt: 1 parameter\(s\) hold NaN or infinity in fp32 \(first: final_layer"
    with pytest.raises(CheckpointError, match=named):
        export_bundle(request(files, out, **{role: tmp_path / "nan.pt"}))
    assert not out.exists()


def test_embeddings_of_another_width_than_the_dit_are_refused_before_any_graph(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("exported a graph before refusing the embeddings")

    monkeypatch.setattr(bundle_writer, "export_vae_cameras_encoder", never)
    narrow = tmp_path / "narrow.safetensors"
    text_store.write(
        narrow, text_store.TextEmbeddings.from_arrays({"task": np.zeros((1, TEXT_TOKENS, 16), np.float32)})
    )
    files = tiny_assets["libero"]
    with pytest.raises(ConfigError, match=r"narrow\.safetensors: 16-wide embeddings, but the DiT .* takes 32-wide"):
        export_bundle(request(files, tmp_path / "bundle", text_embeddings=narrow))
