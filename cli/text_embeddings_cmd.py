"""`cosmos-edge text-embeddings ...`: convert the official T5 pickle, list a store, embed new instructions."""

from __future__ import annotations

import argparse
from pathlib import Path

from cosmos_edge.cli.extras import require_extra
from cosmos_edge.cli.output_paths import writable_file
from cosmos_edge.runtime.engines.registry import load_torch_backend
from cosmos_edge.runtime.policy import text_embeddings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("text-embeddings", help="T5 instruction embeddings (bfloat16 safetensors)")
    commands = parser.add_subparsers(dest="text_embeddings_command")

    convert = commands.add_parser("convert", help="convert an official *_t5_embeddings.pkl to safetensors")
    convert.add_argument("pickle_path", metavar="IN.pkl", help="the official *_t5_embeddings.pkl")
    convert.add_argument("out_path", metavar="OUT.safetensors", help="the file to write (never replaced)")
    convert.add_argument(
        "--trust-pickle",
        action="store_true",
        help="required: confirm the pickle comes from a source you trust (loading a pickle can run code)",
    )
    convert.set_defaults(func=_convert)

    listing = commands.add_parser("list", help="print the instructions a store holds, one per line")
    listing.add_argument("path", metavar="FILE", help="a .safetensors file of instruction embeddings")
    listing.set_defaults(func=_list)

    merge = commands.add_parser("merge", help="one store of the instructions of several (e.g. after `embed`)")
    merge.add_argument("stores", nargs="+", metavar="IN.safetensors", help="the stores to merge")
    merge.add_argument("--out", required=True, metavar="FILE", help="safetensors file to write (must not exist)")
    merge.set_defaults(func=_merge)

    embed = commands.add_parser("embed", help="compute T5 embeddings (needs torch and transformers; T5-11B)")
    embed.add_argument("instructions", nargs="+", metavar="INSTRUCTION", help="the exact text of each instruction")
    embed.add_argument(
        "--out", required=True, metavar="FILE", help="safetensors file to write (must not exist; see merge)"
    )
    embed.add_argument("--model", default="google-t5/t5-11b", help="Hugging Face T5 encoder")
    embed.add_argument("--device", default="cuda", help="torch device for the encoder (default cuda; cpu is slow)")
    embed.set_defaults(func=_embed)


def _convert(args: argparse.Namespace) -> int:
    require_extra("text-embeddings convert", "torch", "torch")
    from cosmos_edge.runtime.models import text_encoder  # torch: only this command needs it

    out = writable_file("OUT.safetensors", Path(args.out_path), replace=False)
    store = text_encoder.convert_official_pickle(args.pickle_path, out, trust_pickle=args.trust_pickle)
    _report_written(store, out)
    return 0


def _report_written(store: text_embeddings.TextEmbeddings, out: Path) -> None:
    count = len(store.instructions)
    print(f"wrote the embeddings of {count} instruction{'s' * (count != 1)}, each {list(store.shape)}, to {out}")


def _list(args: argparse.Namespace) -> int:
    store = text_embeddings.read(args.path)
    for instruction in store.instructions:
        print(instruction)
    return 0


def _merge(args: argparse.Namespace) -> int:
    out = writable_file("--out", Path(args.out), replace=False)
    stores = {path: text_embeddings.read(path) for path in args.stores}
    for path, each in stores.items():
        text_embeddings.check_token_count(each, path)
    store = text_embeddings.merge(stores)
    text_embeddings.write(out, store)
    _report_written(store, out)
    return 0


def _embed(args: argparse.Namespace) -> int:
    require_extra("text-embeddings embed", "t5", "torch", "transformers")  # before the device: both are needed
    from cosmos_edge.runtime.models import text_encoder  # torch and transformers: only this command needs them

    out = writable_file("--out", Path(args.out), replace=False)  # before T5-11B loads
    load_torch_backend().check_device(args.device, name="--device")  # and a device torch cannot use
    store = text_encoder.embed_instructions(args.instructions, out, model=args.model, device=args.device)
    _report_written(store, out)
    return 0
