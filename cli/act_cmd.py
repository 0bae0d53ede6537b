"""`cosmos-edge act`: one policy query from official files and an observation `.npz`, printed and saved."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cosmos_edge.runtime.errors import InputError
from cosmos_edge.runtime.platforms import PLATFORMS, PlatformSpec, platform_spec
from cosmos_edge.runtime.policy_api import ActionQuery, ChunkResult, Observation


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("act", help="run one policy query on an observation .npz")
    parser.add_argument("--checkpoint", type=Path, required=True, help="official DiT .pt (or diffusers dir)")
    parser.add_argument("--tokenizer", type=Path, required=True, help="Wan2.1 tokenizer.pth (or diffusers vae dir)")
    parser.add_argument("--stats", type=Path, required=True, help="dataset statistics JSON")
    parser.add_argument("--text-embeddings", type=Path, required=True, help="instruction embeddings (safetensors)")
    parser.add_argument("--platform", required=True, choices=sorted(PLATFORMS))
    parser.add_argument(
        "--observation", type=Path, required=True, help="npz: one uint8 HxWx3 array per camera, and `proprio`"
    )
    parser.add_argument("--task", required=True, help="the instruction, exactly as in the embeddings file")
    parser.add_argument("--seed", type=int, default=195)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the platform's)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--future-images", action="store_true", help="also decode the predicted future images")
    parser.add_argument("--out", type=Path, help="npz to write: actions, value, future_proprio (+ future images)")
    parser.set_defaults(func=_act)


def read_observation(path: Path, platform: PlatformSpec) -> Observation:
    """Reads an observation npz; the camera names and the proprio are checked by the policy."""
    if not path.is_file():
        raise InputError(f"observation: {path}: no such file")
    with np.load(path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    if "proprio" not in arrays:
        raise InputError(f"observation: {path} has no `proprio` array (found {sorted(arrays)})")
    proprio = arrays.pop("proprio")
    return Observation(images=arrays, proprio=proprio)


def _act(args: argparse.Namespace) -> int:
    from cosmos_edge.runtime.torch_backend import PolicyFiles, load_torch_policy

    platform = platform_spec(args.platform)
    observation = read_observation(args.observation, platform)
    files = PolicyFiles(args.checkpoint, args.tokenizer, args.stats, args.text_embeddings, args.platform)
    policy = load_torch_policy(files, precision=args.precision, device=args.device)
    query = ActionQuery(observation, args.task, args.seed, args.steps, return_future_images=args.future_images)
    result = policy.infer(query)
    print_result(result)
    if args.out is not None:
        save_result(args.out, result)
        print(f"wrote {args.out}")
    return 0


def print_result(result: ChunkResult) -> None:
    print(f"action chunk: {result.actions.shape[0]} x {result.actions.shape[1]} (float32, un-normalised)")
    print(f"value:        {result.value:.4f}")
    print("stage timings (ms): " + ", ".join(f"{name} {ms:.1f}" for name, ms in result.timings_ms.items()))


def save_result(path: Path, result: ChunkResult) -> None:
    images = {f"future_image_{name}": image for name, image in (result.future_images or {}).items()}
    np.savez(
        path,
        actions=result.actions,
        value=np.float32(result.value),
        future_proprio=result.future_proprio,
        **images,
    )
