"""The `.npz` files of the command line: observations read (never unpickled) and results written, with errors that
name the file and its flag."""

from __future__ import annotations

import argparse
import io
import logging
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cosmos_edge.cli.output_paths import writable_file
from cosmos_edge.robot_bridge.robots.camera_frames import aloha_wire_images
from cosmos_edge.runtime.errors import ConfigError, InputError
from cosmos_edge.runtime.files import write_atomic
from cosmos_edge.runtime.platforms import IMAGE_SIZE, PlatformSpec
from cosmos_edge.runtime.policy.api import Observation

_LOG = logging.getLogger(__name__)


def add_observation_arguments(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The observation file, as OBSERVATION or as --observation (`act` and `client act` take both)."""
    parser.add_argument("observation", type=Path, nargs="?", help=help_text)
    parser.add_argument(
        "--observation", dest="observation_flag", type=Path, metavar="OBSERVATION", help="the same, as a flag"
    )


def add_frames_argument(parser: argparse.ArgumentParser) -> None:
    """`--frames`: whether the observation's camera frames are as a LIBERO or RoboCasa simulator renders them."""
    parser.add_argument(
        "--frames",
        choices=("as-rendered", "upright"),
        default="as-rendered",
        help="LIBERO and RoboCasa: the camera frames are as the simulator renders them (upside down; the default: "
        "flipped as the official evaluation scripts flip them) or upright already (flipped by the caller, as the "
        "official quickstart's sample observation, which the official get_action takes as it is)",
    )


def as_rendered(platform: PlatformSpec, observation: Observation) -> Observation:
    """`--frames upright`: the frames turned upside down (a lossless flip), as the simulator rendered them, so that
    the policy's flip restores them."""
    if not platform.flip_images:
        raise ConfigError(f"--frames upright: {platform.name} frames are never flipped; drop the flag")
    images = {camera: np.ascontiguousarray(frame[::-1]) for camera, frame in observation.images.items()}
    return Observation(images, observation.proprio)


def as_the_aloha_client_sends(observation: Observation) -> Observation:
    """ALOHA camera frames of another size than 224×224 resized as the official client (and the ALOHA controller)
    resizes them before a server sees them; said in the log."""
    images, resized = aloha_wire_images(observation.images)
    if resized:
        _LOG.info(
            "observation: resizing %s to %dx%d, as the official ALOHA client does", resized, IMAGE_SIZE, IMAGE_SIZE
        )
    return Observation(images, observation.proprio)


def observation_path(args: argparse.Namespace) -> Path:
    """The observation file of `add_observation_arguments`, given exactly once."""
    if (args.observation is None) == (args.observation_flag is None):
        raise ConfigError("observation: give the observation .npz once, as OBSERVATION or --observation")
    path: Path = args.observation or args.observation_flag
    return path


def read_observation(path: Path) -> Observation:
    """Reads an observation npz: `proprio` and one image per camera (the names and shapes are checked by the
    policy or the server that answers it)."""
    if path.is_dir():
        raise InputError(f"observation: {path}: is a directory; expected an .npz file")
    if not path.is_file():
        raise InputError(f"observation: {path}: no such file")
    with path.open("rb") as file:
        magic = file.read(4)
    if magic == b"PK\x05\x06":  # a zip archive's end record first: `np.savez` given no array
        raise InputError(f"observation: {path}: an .npz holding no arrays; expected `proprio` and one per camera")
    if magic != b"PK\x03\x04":  # every .npz is a zip archive
        raise InputError(f"observation: {path}: not an .npz archive (np.savez writes one), it starts with {magic!r}")
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
    except (OSError, zipfile.BadZipFile) as error:
        raise InputError(f"observation: {path}: not a readable .npz ({error})") from None
    others = [name for name in members if not name.endswith(".npy")]
    if others:  # np.load would hand them back as raw bytes
        looks = " (a PyTorch checkpoint?)" if any(name.endswith("data.pkl") for name in others) else ""
        raise InputError(
            f"observation: {path}: a zip archive{looks}, not an .npz of arrays: {len(others)} of its "
            f"{len(members)} members are not .npy files (first: {others[0]!r})"
        )
    try:
        loaded = np.load(path, allow_pickle=False)
        with loaded:
            arrays = {name: loaded[name] for name in loaded.files}
    except ValueError as error:
        if "allow_pickle" in str(error):  # numpy refuses object arrays without it
            raise InputError(f"observation: {path}: holds object arrays, which are never loaded (pickles)") from None
        raise InputError(f"observation: {path}: not a readable .npz ({error})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"observation: {path}: not a readable .npz ({error})") from None
    if "proprio" not in arrays:
        raise InputError(f"observation: {path} has no `proprio` array (found {sorted(arrays)[:8]})")
    proprio = arrays.pop("proprio")
    return Observation(images=arrays, proprio=proprio)


def output_path(flag: str, path: Path) -> Path:
    """The file `np.savez` writes for `path` (it adds `.npz` to a name without it), refused before the work whose
    result it would hold if it could not be written, or if it exists (an observation given as `--out` included)."""
    writable_file(flag, path)  # `--out results` naming a directory is refused as such, not as results.npz
    if path.suffix not in ("", ".npz"):  # `result.json` would quietly become `result.json.npz`
        raise ConfigError(f"{flag} {path}: writes a numpy .npz archive; name it {path.with_suffix('.npz').name}")
    return writable_file(flag, path if path.suffix == ".npz" else path.with_name(path.name + ".npz"), replace=False)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes `arrays` to `path` (an `output_path`), whole or not at all: a truncated archive (a full disk) would be
    refused as existing by the next run. Results are small: the archive is made in memory."""
    archive = io.BytesIO()
    np.savez(archive, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds like allow_pickle
    write_atomic(path, archive.getvalue())
