"""Bad input through the command line: one `cosmos-edge: error:` line naming the file or the flag, exit code 2."""

from __future__ import annotations

import io
import json
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cosmos_edge.cli import act_cmd
from cosmos_edge.cli.main import main
from cosmos_edge.runtime.files import CheckpointFiles
from cosmos_edge.runtime.policy import text_embeddings

Case = Callable[[CheckpointFiles, Path], tuple[list[str], str]]


def files_args(files: CheckpointFiles, **override: Path) -> list[str]:
    paths = {
        "checkpoint": files.checkpoint,
        "tokenizer": files.tokenizer,
        "stats": files.stats,
        "text-embeddings": files.text_embeddings,
    } | {name.replace("_", "-"): path for name, path in override.items()}
    return [arg for name, path in paths.items() for arg in (f"--{name}", str(path))] + ["--platform", "aloha"]


def observation(tmp: Path, proprio: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(0)
    images = {name: rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for name in ("cam_high", "cam_left_wrist")}
    images["cam_right_wrist"] = images["cam_high"]
    proprio = np.zeros(14, np.float32) if proprio is None else proprio
    np.savez(tmp / "obs.npz", proprio=proprio, **images)  # type: ignore[arg-type]
    return tmp / "obs.npz"


def act(
    files: CheckpointFiles, tmp: Path, *extra: str, observation_path: Path | None = None, **override: Path
) -> list[str]:
    obs = observation_path or observation(tmp)
    return ["act", *files_args(files, **override), "--observation", str(obs), "--task", "fold the t-shirt", *extra]


def write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def stats_with(files: CheckpointFiles, tmp: Path, **changes: object) -> Path:
    stats = json.loads(files.stats.read_text()) | changes
    path = tmp / "stats.json"
    path.write_text(json.dumps(stats))
    return path


LONG = "x" * 300  # a file name the system refuses (ENAMETOOLONG): an OSError of a path, not of a cosmos-edge check

CASES: dict[str, Case] = {
    "checkpoint to inspect named past the system's limit": lambda f, t: (
        ["checkpoint", "inspect", str(t / f"{LONG}.pt")],
        f"{LONG}.pt: File name too long",
    ),
    "keys folder named past the system's limit": lambda f, t: (
        ["keys", "generate", str(t / LONG)],
        f"{LONG}: File name too long",
    ),
    "cuda on a CPU-only torch": lambda f, t: (act(f, t, "--device", "cuda"), "--device cuda: this torch ("),
    "not a device": lambda f, t: (act(f, t, "--device", "banana"), "--device banana: not a torch device"),
    "observation is text": lambda f, t: (act(f, t, observation_path=write(t, "o.npz", b"hello")), "o.npz"),
    "truncated observation": lambda f, t: (
        act(f, t, observation_path=write(t, "o.npz", observation(t).read_bytes()[:500])),
        "o.npz",
    ),
    "observation of object arrays": lambda f, t: (
        act(f, t, observation_path=_objects(t)),
        "objects.npz",
    ),
    "an empty npz": lambda f, t: (
        act(f, t, observation_path=_empty_npz(t)),
        "empty.npz: an .npz holding no arrays; expected `proprio` and one per camera",
    ),
    "complex proprio": lambda f, t: (
        act(f, t, observation_path=observation(t, np.zeros(14, np.complex64))),
        "obs.npz: proprio: expected numbers [..., 14], got dtype complex64",
    ),
    "missing pickle": lambda f, t: (
        ["text-embeddings", "convert", str(t / "nope.pkl"), str(t / "o.safetensors"), "--trust-pickle"],
        "nope.pkl",
    ),
    "swapped checkpoint and tokenizer": lambda f, t: (
        act(f, t, checkpoint=f.tokenizer, tokenizer=f.checkpoint),
        f"--tokenizer {f.checkpoint}: not a Wan2.1 VAE (the tokenizer.pth) (it holds a Cosmos DiT: the policy "
        "checkpoint given",
    ),
    "VAE given as the DiT": lambda f, t: (
        act(f, t, checkpoint=f.tokenizer),
        # The tokenizer is given twice: both flags are named.
        f"--checkpoint and --tokenizer {f.tokenizer}: not a Cosmos-Predict2 DiT checkpoint (it holds a Wan2.1 "
        "VAE: the tokenizer given for a DiT?)",
    ),
    "VAE given as the planning DiT": lambda f, t: (
        act(f, t, "--mode", "planning", planning_checkpoint=f.tokenizer),
        f"--planning-checkpoint {f.tokenizer}: not a Cosmos-Predict2 DiT checkpoint (it holds a Wan2.1 VAE",
    ),
    "empty checkpoint": lambda f, t: (act(f, t, checkpoint=write(t, "empty.pt", b"")), "empty.pt"),
    "a file as the demo's folder": lambda f, t: (
        ["demo", "--out", str(write(t, "notes.txt", b"x"))],
        "notes.txt: is a file; expected a directory",
    ),
    "a file as the random model's folder": lambda f, t: (
        ["checkpoint", "random", "--out", str(write(t, "notes.txt", b"x"))],
        "notes.txt: is a file; expected a directory",
    ),
    "a file as the bundle": lambda f, t: (
        ["export", *files_args(f), "--for", "cpu", "--out", str(write(t, "notes.txt", b"x"))],
        "notes.txt: is a file; a bundle is a directory",
    ),
    "checkpoint that is a device": lambda f, t: (
        act(f, t, checkpoint=Path("/dev/null")),
        "--checkpoint /dev/null: not a regular file",
    ),
    "short stats list": lambda f, t: (
        act(f, t, stats=stats_with(f, t, actions_min=[0.0] * 3)),
        f"--stats {t / 'stats.json'}: ",
    ),
    "non-numeric stats": lambda f, t: (act(f, t, stats=stats_with(f, t, actions_min=["a"] * 14)), "stats.json"),
    "constant action dimension": lambda f, t: (
        act(f, t, stats=stats_with(f, t, actions_max=json.loads(f.stats.read_text())["actions_min"])),
        "stats.json",
    ),
    "JSON as text embeddings": lambda f, t: (
        act(f, t, text_embeddings=f.stats),
        f"--stats and --text-embeddings {f.stats}: ",
    ),
    "text embeddings of another model": lambda f, t: (
        act(f, t, text_embeddings=_narrow_embeddings(t)),
        f"--text-embeddings {t / 'narrow.safetensors'}: 7-wide embeddings, but the DiT {f.checkpoint} takes",
    ),
    "text embeddings not padded to 512 tokens": lambda f, t: (
        act(f, t, text_embeddings=_short_embeddings(f, t)),
        f"--text-embeddings {t / 'short.safetensors'}: 12 tokens per instruction, expected 512",
    ),
    "a bundle that is a file": lambda f, t: (
        ["act", "--bundle", str(f.stats), "--observation", str(observation(t)), "--task", "t"],
        f"--bundle {f.stats}: is a file; a bundle is the directory",
    ),
    "missing CURVE key": lambda f, t: (
        serve(f, "--curve-secret-key", str(t / "none.key_secret"), t),
        f"--curve-secret-key {t / 'none.key_secret'}: no such file",
    ),
    "CURVE key that is not a certificate": lambda f, t: (
        serve(f, "--curve-secret-key", str(write(t, "bad.key_secret", b"hello")), t),
        "bad.key_secret",
    ),
    "client certificate that is not one": lambda f, t: (
        ["serve", *files_args(f), *_server_curve(t, {"bad.key": b"hello"})],
        "bad.key",
    ),
    "no client certificates": lambda f, t: (["serve", *files_args(f), *_server_curve(t, {})], "clients"),
    "array limit above the message limit": lambda f, t: (
        ["serve", *files_args(f), "--max-array-mb", "32"],
        "--max-array-mb 32",
    ),
    "message limit below one act": lambda f, t: (
        ["serve", *files_args(f), "--max-message-mb", "0.4", "--max-array-mb", "0.2"],
        "--max-message-mb: 419430 bytes cannot hold one act of the aloha platform",
    ),
    "future images with nowhere to write them": lambda f, t: (act(f, t, "--future-images"), "--future-images"),
    "act output in a missing directory": lambda f, t: (act(f, t, "--out", str(t / "no" / "r.npz")), "--out"),
    "client output in a missing directory": lambda f, t: (
        ["client", "act", str(observation(t)), "--task", "t", "--out", str(t / "no" / "r.npz")],
        "--out",
    ),
    "observation with a corrupt array": lambda f, t: (
        act(f, t, observation_path=_corrupt_member(t)),
        "corrupt.npz: not a readable .npz",
    ),
    "export over an existing bundle": lambda f, t: (
        ["export", *files_args(f), "--out", str(write(t, "bundle", b"x").parent), "--precision", "fp32"],
        f"{t}: already exists and is not an empty directory; remove it or choose another --out",
    ),
    "export into a file's place": lambda f, t: (
        ["export", *files_args(f), "--out", str(write(t, "afile", b"x") / "bundle"), "--precision", "fp32"],
        f"afile/bundle: no directory {t / 'afile'}; make it first or choose another --out",
    ),
    "export into a missing directory": lambda f, t: (
        ["export", *files_args(f), "--out", str(t / "no" / "bundle"), "--precision", "fp32"],
        f"no/bundle: no directory {t / 'no'}; make it first",
    ),
    "export of a checkpoint that is not there": lambda f, t: (
        ["export", *files_args(f, checkpoint=t / "nope.pt"), "--out", str(t / "bundle"), "--precision", "fp32"],
        f"--checkpoint: {t / 'nope.pt'}",
    ),
    "random model into a file's place": lambda f, t: (
        ["checkpoint", "random", "--out", str(write(t, "afile", b"x") / "model")],
        "afile/model: cannot write the model files there",
    ),
    "random model over an official file": lambda f, t: (
        ["checkpoint", "random", "--out", str(write(t, "tokenizer.pth", b"the real VAE").parent)],
        f"would replace ['{t / 'tokenizer.pth'}']",
    ),
    "an observation without a camera": lambda f, t: (
        act(f, t, observation_path=_without_camera(t)),
        f"observation: {t / 'two_cameras.npz'}: images: aloha expects cameras",
    ),
    "an observation with a far-out proprio": lambda f, t: (
        act(f, t, observation_path=_far_proprio(t)),
        f"observation: {t / 'far.npz'}: proprio: 1e+30 at index [0] lies far outside the dataset range",
    ),
    "engines for a bundle that is not there": lambda f, t: (
        ["engines", "build", str(t / "no_bundle")],
        f"{t / 'no_bundle'}: no such bundle directory",
    ),
    "a JSON file as the checkpoint": lambda f, t: (
        act(f, t, checkpoint=f.stats),
        f"{f.stats}: not a PyTorch checkpoint",
    ),
    "the default planning preset in reactive mode": lambda f, t: (
        act(f, t, "--planning-preset", "main"),
        "--planning-preset: a planning option, which needs --mode planning",
    ),
    "a planning option in reactive mode": lambda f, t: (
        act(f, t, "--num-queries-best-of-n", "4"),
        "--num-queries-best-of-n: a planning option, which needs --mode planning",
    ),
    "a planning option in reactive mode, by its alias": lambda f, t: (
        act(f, t, "--num-candidates", "4"),
        "--num-candidates: a planning option, which needs --mode planning",
    ),
    "a checkpoint given as the statistics": lambda f, t: (act(f, t, stats=f.tokenizer), str(f.tokenizer)),
    "a compile scope without compilation": lambda f, t: (
        act(f, t, "--compile-scope", "blocks"),
        "--compile-scope blocks: compilation is off (--no-compile, or the CPU default); add --compile",
    ),
    "a compile scope for the reference": lambda f, t: (
        act(f, t, "--compile-scope", "blocks", "--reference"),
        "--compile-scope blocks: --reference runs the official path uncompiled",
    ),
    "CUDA graphs for the reference": lambda f, t: (
        act(f, t, "--cuda-graphs", "--reference"),
        "--cuda-graphs: --reference runs the official path uncompiled, without graphs",
    ),
    "CUDA graphs on the CPU": lambda f, t: (
        act(f, t, "--cuda-graphs"),
        "--cuda-graphs: CUDA graphs need CUDA devices; got ['cpu']",
    ),
    "compilation for the reference": lambda f, t: (
        act(f, t, "--compile", "--reference"),
        "--compile: --reference runs the official path uncompiled",
    ),
    "act output is a directory": lambda f, t: (act(f, t, "--out", str(t)), f"--out {t}: is a directory"),
    "act output of another kind": lambda f, t: (
        act(f, t, "--out", str(t / "result.json")),
        f"--out {t / 'result.json'}: writes a numpy .npz archive; name it result.npz",
    ),
    "a deeper search of Q(s, a) planning": lambda f, t: (
        act(f, t, "--mode", "planning", "--search-depth", "2", "--ar-qvalue-prediction"),
        "--search-depth: above 1 is not supported with --ar-qvalue-prediction (as officially)",
    ),
    "act output is the observation": lambda f, t: (
        act(f, t, "--out", str(t / "obs.npz")),
        f"--out {t / 'obs.npz'}: exists, and is never replaced",
    ),
    "observation is a directory": lambda f, t: (act(f, t, observation_path=t), f"observation: {t}: is a directory"),
    "an observation given as the checkpoint": lambda f, t: (
        act(f, t, checkpoint=observation(t)),
        f"{t / 'obs.npz'}: a numpy .npz archive, not a PyTorch checkpoint",
    ),
    "a checkpoint given as the text embeddings": lambda f, t: (
        act(f, t, text_embeddings=f.checkpoint),
        f"{f.checkpoint}: a zip archive (a PyTorch checkpoint or an .npz?), not a safetensors file",
    ),
    "a checkpoint given as the observation": lambda f, t: (
        act(f, t, observation_path=f.tokenizer),
        f"error: observation: {f.tokenizer}: a zip archive (a PyTorch checkpoint?), not an .npz of arrays",
    ),
    "future images of Q(s, a) planning without a world model": lambda f, t: (
        act(
            f,
            t,
            "--mode",
            "planning",
            "--planning-preset",
            "base",
            "--ar-qvalue-prediction",
            "--future-images",
            "--out",
            str(t / "result.npz"),
        ),
        "--future-images: Q(s, a) planning without --ar-future-prediction predicts no future state",
    ),
    "steps given twice in planning": lambda f, t: (
        act(f, t, "--mode", "planning", "--steps", "3", "--num-denoising-steps-action", "5"),
        "--steps: in planning mode it is --num-denoising-steps-action",
    ),
    "all query results in reactive mode": lambda f, t: (
        act(f, t, "--return-all-query-results"),
        "--return-all-query-results: a planning option, which needs --mode planning",
    ),
    "all query results without an output file": lambda f, t: (
        act(f, t, "--mode", "planning", "--return-all-query-results"),
        "--return-all-query-results: every candidate's results are written to the --out file; give --out",
    ),
    "a planning checkpoint in reactive mode": lambda f, t: (
        act(f, t, "--planning-checkpoint", str(f.tokenizer)),
        "--planning-checkpoint: a planning option, which needs --mode planning",
    ),
    "planning options named as flags": lambda f, t: (
        act(f, t, "--mode", "planning", "--no-ar-future-prediction"),
        "--ar-value-prediction: needs --ar-future-prediction",
    ),
    "lcb over a single value": lambda f, t: (
        act(
            f,
            t,
            "--mode",
            "planning",
            "--num-value-predictions-in-ensemble",
            "1",
            "--num-future-state-predictions-in-ensemble",
            "1",
            "--value-ensemble-aggregation-scheme",
            "lcb",
        ),
        "--value-ensemble-aggregation-scheme: lcb needs 2 or more values to pool, and this configuration pools 1 "
        "(raise --num-value-predictions-in-ensemble or --num-future-state-predictions-in-ensemble)",
    ),
    "converted embeddings into a missing directory": lambda f, t: (
        ["text-embeddings", "convert", str(write(t, "e.pkl", b"x")), str(t / "no" / "e.safetensors"), "--trust-pickle"],
        f"{t / 'no' / 'e.safetensors'} (OUT.safetensors): no directory",
    ),
    "the statistics given as the pickle": lambda f, t: (
        ["text-embeddings", "convert", str(f.stats), str(t / "e.safetensors"), "--trust-pickle"],
        f"{f.stats}: it looks like JSON (the dataset statistics?); convert takes the official *_t5_embeddings.pkl",
    ),
    "the DiT given as the pickle": lambda f, t: (
        ["text-embeddings", "convert", str(f.checkpoint), str(t / "e.safetensors"), "--trust-pickle"],
        "tensors are no [1, tokens, dim] instruction embedding (first: 'net.",
    ),
    "an npz given as the pickle": lambda f, t: (
        ["text-embeddings", "convert", str(observation(t)), str(t / "e.safetensors"), "--trust-pickle"],
        "obs.npz: a zip archive that is no torch.save archive of tensors (an .npz?); expected the official",
    ),
    "a pickle error is one line": lambda f, t: (
        [
            "text-embeddings",
            "convert",
            str(write(t, "bad.pkl", b"\x80\x04garbage")),
            str(t / "e.safetensors"),
            "--trust-pickle",
        ],
        "bad.pkl: not a readable pickle",
    ),
    "client timeout infinite": lambda f, t: (["client", "ping", "--timeout", "inf"], "--timeout"),
    "client timeout of days": lambda f, t: (
        ["client", "ping", "--timeout", "90000"],
        "--timeout: expected a finite number in (0, 86400]",
    ),
    "client endpoint without a scheme": lambda f, t: (["client", "ping", "--endpoint", "localhost:5555"], "--endpoint"),
}


def serve(files: CheckpointFiles, flag: str, value: str, tmp: Path) -> list[str]:
    (tmp / "clients").mkdir(exist_ok=True)
    return ["serve", *files_args(files), flag, value, "--curve-clients", str(tmp / "clients")]


def _server_curve(tmp: Path, clients: dict[str, bytes]) -> list[str]:
    """`serve`'s CURVE flags: a real server key pair, and a client directory holding `clients` (name -> bytes)."""
    zmq_auth = pytest.importorskip("zmq.auth")
    _, secret = zmq_auth.create_certificates(tmp, "server")
    directory = tmp / "clients"
    directory.mkdir()
    for name, data in clients.items():
        (directory / name).write_bytes(data)
    return ["--curve-secret-key", str(secret), "--curve-clients", str(directory)]


def _corrupt_member(tmp: Path) -> Path:
    """An .npz whose `proprio` member is cut short: a readable archive of an unreadable array."""
    with zipfile.ZipFile(tmp / "corrupt.npz", "w") as archive:
        archive.writestr("proprio.npy", _npy_bytes()[:-8])
    return tmp / "corrupt.npz"


def _npy_bytes() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(14, np.float32))
    return buffer.getvalue()


def _without_camera(tmp: Path) -> Path:
    with np.load(observation(tmp)) as loaded:
        arrays = {name: loaded[name] for name in loaded.files if name != "cam_high"}
    np.savez(tmp / "two_cameras.npz", **arrays)  # type: ignore[arg-type]
    return tmp / "two_cameras.npz"


def _far_proprio(tmp: Path) -> Path:
    with np.load(observation(tmp)) as loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    arrays["proprio"] = np.full(14, 1e30, np.float32)
    np.savez(tmp / "far.npz", **arrays)  # type: ignore[arg-type]
    return tmp / "far.npz"


def _narrow_embeddings(tmp: Path) -> Path:
    text_embeddings.write(tmp / "narrow.safetensors", {"fold the t-shirt": np.zeros((1, 8, 7), np.float32)})
    return tmp / "narrow.safetensors"


def _short_embeddings(files: CheckpointFiles, tmp: Path) -> Path:
    """The DiT's width, but T5's 12 tokens of the text alone (not padded to 512)."""
    width = text_embeddings.read(files.text_embeddings).shape[-1]
    text_embeddings.write(tmp / "short.safetensors", {"fold the t-shirt": np.zeros((1, 12, width), np.float32)})
    return tmp / "short.safetensors"


def _empty_npz(tmp: Path) -> Path:
    np.savez(tmp / "empty.npz")
    return tmp / "empty.npz"


def _objects(tmp: Path) -> Path:
    np.savez(tmp / "objects.npz", cam_high=np.array([{"a": 1}], dtype=object), proprio=np.zeros(14))
    return tmp / "objects.npz"


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_naming_the_file_or_flag(
    name: str, tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, named = CASES[name](tiny_assets["aloha"], tmp_path)
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cosmos-edge: error: "), lines
    assert named in lines[0], lines[0]


@pytest.fixture
def loading_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """`act` fails the test if it loads a model: what the test gives it must be refused before."""

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded the model for a query it had to refuse first")

    monkeypatch.setattr(act_cmd, "load_policies", never)


@pytest.mark.parametrize(
    ("arrays", "named"),
    [
        ({"cam_top": np.zeros((224, 224, 3), np.uint8)}, "images: aloha expects cameras"),
        ({"proprio": np.zeros(7, np.float32)}, "proprio: expected shape (14,), got (7,)"),
        ({"proprio": np.zeros((1, 14), np.float32)}, "proprio: expected shape (14,), got (1, 14)"),
    ],
    ids=["camera names", "proprio size", "proprio batch"],
)
@pytest.mark.usefixtures("loading_refused")
def test_act_checks_the_observation_before_loading_the_model(
    arrays: dict[str, np.ndarray],
    named: str,
    tiny_assets: dict[str, CheckpointFiles],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with np.load(observation(tmp_path)) as good:
        fields = {name: good[name] for name in good.files}
    if "cam_top" in arrays:
        del fields["cam_high"]
    np.savez(tmp_path / "bad.npz", **(fields | arrays))  # type: ignore[arg-type]
    assert main(act(tiny_assets["aloha"], tmp_path, observation_path=tmp_path / "bad.npz")) == 2
    assert f"observation: {tmp_path / 'bad.npz'}: {named}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("task", "override", "named"),
    [
        (
            "fold the towel",
            {},
            "--task 'fold the towel': not among the instructions of {files.text_embeddings}: no text embedding for",
        ),
        ("fold the t-shirt", {"tokenizer": "nope.pth"}, "--tokenizer {tmp}/nope.pth: no such file"),
        ("fold the t-shirt", {"planning_checkpoint": "nope.pt"}, "--planning-checkpoint {tmp}/nope.pt: no such file"),
    ],
    ids=["unknown task", "missing tokenizer", "missing planning checkpoint"],
)
@pytest.mark.usefixtures("loading_refused")
def test_act_checks_the_task_and_the_files_before_loading_the_model(
    task: str,
    override: dict[str, str],
    named: str,
    tiny_assets: dict[str, CheckpointFiles],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = act(tiny_assets["aloha"], tmp_path, **{name: tmp_path / path for name, path in override.items()})
    argv[argv.index("--task") + 1] = task
    assert main(argv) == 2
    assert named.format(tmp=tmp_path, files=tiny_assets["aloha"]) in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1", "lots"])
def test_message_limits_must_be_finite_sizes(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--max-message-mb", value])
    assert exited.value.code == 2
    assert "argument --max-message-mb: expected a" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--max-message-mb", "1e20"], "argument --max-message-mb: expected at most 4096 MiB, got '1e20'"),
        (["act", "--planning-deadline-ms", "1e13"], "--planning-deadline-ms: expected at most 8.64e+07 milliseconds"),
        (["serve", "--http-read-timeout-s", "1e12"], "--http-read-timeout-s: expected at most 3.1536e+07 seconds"),
        (["robot", "--task", "t", "--control-rate-hz", "1e9"], "--control-rate-hz: expected at most 10000 Hz"),
    ],
)
def test_numbers_past_what_a_wait_or_a_socket_takes_are_usage_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0.5", "nan", "x"])
def test_the_latency_margin_is_a_factor_of_at_least_one(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["robot", "--task", "t", "--latency-margin", value])
    assert exited.value.code == 2
    assert "argument --latency-margin: expected a" in capsys.readouterr().err


def test_the_demo_without_the_sim_extra_says_so_before_writing_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "gym_aloha", None)  # an import of it fails, as when it is not installed
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1  # the environment lacks it: not a usage error
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "demo needs gym_aloha" in lines[0] and "cosmos-edge[sim]" in lines[0], lines
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["demo", "--steps", "0"], "expected an integer in 1..100"),
        (["demo", "--steps", "1000"], "expected an integer in 1..100"),  # the server would refuse every request
        (["demo", "--chunks", "-1"], "expected an integer > 0"),
        (["demo", "--seed", "-1"], "expected an integer in 0..4294967295"),
    ],
)
def test_demo_numbers_are_checked(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["act", "--seed", "abc"], "act: argument --seed: expected an integer in 0..4294967295, got 'abc'"),
        (["checkpoint", "random", "--seed", "-1"], "checkpoint random: argument --seed: expected an integer in 0.."),
        (["export", "--precision", "fp8"], "export: argument --precision: invalid choice: 'fp8'"),
        (["client", "act"], "client act: the following arguments are required"),
        (
            ["act", "--num-candidates", "0"],
            "act: argument --num-queries-best-of-n/--num-candidates: expected an integer in 1..64, got '0'",
        ),
        (["serve", "--search-depth", "-1"], "serve: argument --search-depth: expected an integer in 1..8, got '-1'"),
        (
            ["serve", "--search-depth", "1000"],
            "serve: argument --search-depth: expected an integer in 1..8, got '1000'",
        ),
        (
            ["engines", "build", "b", "--device", "gpu0"],
            "engines build: argument --device: expected cuda or cuda:N, got 'gpu0'",
        ),
        (["export", "--batch-sizes", "2,8"], "export: argument --batch-sizes: expected 1 among them"),
        (["export", "--batch-sizes", "1,100000"], "export: argument --batch-sizes: expected distinct ints in 1..64"),
        (["serve", "--default-mode", "banana"], "serve: argument --default-mode: invalid choice: 'banana'"),
        (["act", "--steps", "1000"], "act: argument --steps: expected an integer in 1..100, got '1000'"),
        (
            ["act", "--num-candidates", "2", "--num-queries-best-of-n", "3"],
            "act: argument --num-queries-best-of-n/--num-candidates: given twice",
        ),
        (
            ["serve", "--value-ensemble-aggregation-scheme", "use_last_value"],
            "serve: argument --value-ensemble-aggregation-scheme: invalid choice: 'use_last_value'",
        ),
        (["act", "--observation", "o", "--task", "t", "--nope", "3"], "act: unrecognized arguments: --nope"),
        (["client", "ping", "-v"], "client ping: unrecognized arguments: -v (-v/--verbose goes before the command)"),
        (
            ["checkpoint", "--json", "inspect", "x.pt"],
            "checkpoint inspect: unrecognized arguments: --json (options go after the command they belong to",
        ),
        (
            ["client", "--endpoint", "tcp://127.0.0.1:5555", "ping"],
            "invalid choice: 'tcp://127.0.0.1:5555' (choose from 'ping', 'metadata', 'set-mode', 'act'); options go "
            "after the command they belong to (cosmos-edge client COMMAND [options])",
        ),
        (["text-embeddings"], "text-embeddings: the following arguments are required: {convert,list,merge,embed}"),
    ],
)
def test_usage_errors_are_one_line_too(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1 and lines[0].startswith("cosmos-edge: error: "), lines
    assert named in lines[0] and lines[0].endswith("--help)")


def test_a_positional_file_is_not_named_as_an_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # `engines build BUNDLE` takes the bundle as a positional argument: no `--bundle` to name.
    assert main(["engines", "build", str(tmp_path / "nobundle")]) == 2
    error = capsys.readouterr().err
    assert f"cosmos-edge: error: {tmp_path / 'nobundle'}: " in error and "--bundle" not in error


@pytest.mark.usefixtures("loading_refused")
def test_a_planning_seed_its_passes_would_overflow_is_refused_before_loading(
    tiny_assets: dict[str, CheckpointFiles], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The main configuration's passes take seeds up to seed + 7 + 4 (8 candidates, 5 value passes each).
    assert main(act(tiny_assets["aloha"], tmp_path, "--mode", "planning", "--seed", "4294967285")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (
        "cosmos-edge: error: --seed: expected 0..4294967284 with this planning configuration (its passes use seeds "
        "up to seed + 11), got 4294967285"
    )
