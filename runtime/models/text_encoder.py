"""Writing instruction-embedding files from the official sources: the official T5 pickle, or the T5 encoder itself.

`convert_official_pickle` is the only place cosmos-edge reads a pickle, and `embed_instructions` the only place it runs
T5 (transformers is imported only there); serving reads the files with `policy/text_embeddings.py`, without torch.
"""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from cosmos_edge.runtime.errors import CheckpointError, EngineError, InputError
from cosmos_edge.runtime.files import starts_like_json
from cosmos_edge.runtime.policy.text_embeddings import TEXT_TOKENS, TextEmbeddings, check_token_count, write

T5_MODEL = "google-t5/t5-11b"


def convert_official_pickle(pkl_path: str | Path, out_path: str | Path, trust_pickle: bool) -> TextEmbeddings:
    """Converts an official `*_t5_embeddings.pkl` ({instruction: bf16 tensor}, possibly CUDA tensors) to safetensors.

    Refused unless `trust_pickle` is True. Even then the file is read with `torch.load(weights_only=True)` when it
    is a torch.save archive, and otherwise by an unpickler that allows only the globals a pickled tensor needs
    (tensor rebuild, storage-from-bytes loaded with weights_only=True onto the CPU, OrderedDict).
    """
    pkl_path = Path(pkl_path)
    if not pkl_path.is_file():
        raise CheckpointError(f"{pkl_path}: no such file")
    if pkl_path.stat().st_size == 0:
        raise CheckpointError(f"{pkl_path}: the file is empty; expected the official *_t5_embeddings.pkl")
    with pkl_path.open("rb") as file:
        if starts_like_json(file.read(64)):
            raise CheckpointError(
                f"{pkl_path}: it looks like JSON (the dataset statistics?); convert takes the official "
                "*_t5_embeddings.pkl"
            )
    if _is_safetensors(pkl_path):
        # torch.load would read it, as tensors named in the order stored: the instructions, in its metadata, lost.
        raise CheckpointError(
            f"{pkl_path}: already a safetensors file (a store this project writes: `cosmos-edge text-embeddings "
            "list` shows it); convert takes the official *_t5_embeddings.pkl"
        )
    if not trust_pickle:
        raise CheckpointError(
            f"{pkl_path}: refused, a pickle can run code when loaded; pass --trust-pickle (trust_pickle=True) "
            f"only for a file from a source you trust, such as the official nvidia/Cosmos-Policy-* repositories"
        )
    loaded = _load_tensor_pickle(pkl_path)
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(
            f"{pkl_path}: expected a non-empty dict of instruction -> tensor, got {type(loaded).__name__}"
        )
    arrays = {}
    for instruction, tensor in loaded.items():
        if not isinstance(instruction, str) or not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{pkl_path}: expected str -> tensor entries, "
                f"got {type(instruction).__name__} -> {type(tensor).__name__}"
            )
        arrays[instruction] = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
    if others := [name for name, array in arrays.items() if array.ndim != 3 or array.shape[0] != 1]:
        raise CheckpointError(
            f"{pkl_path}: {len(others)} of its {len(arrays)} tensors are no [1, tokens, dim] instruction embedding "
            f"(first: {others[0][:80]!r} of shape {list(arrays[others[0]].shape)}); convert takes the official "
            "*_t5_embeddings.pkl, instruction -> [1, 512, dim]"
        )
    try:
        store = TextEmbeddings.from_arrays(arrays)
    except InputError as error:  # entries of several shapes, or not [1, tokens, dim]
        raise CheckpointError(f"{pkl_path}: {error}") from None
    check_token_count(store, pkl_path)  # refused here, not by every command that would read the store
    write(out_path, store)
    return store


def embed_instructions(
    instructions: Sequence[str], out_path: str | Path, model: str = T5_MODEL, device: str = "cuda"
) -> TextEmbeddings:
    """Computes T5 encoder embeddings like the official `get_t5_emb.py` and writes them with `write`.

    Tokenise with padding to max_length 512 (truncating), encode in float32, zero the positions past the true
    length, round to bfloat16. Needs `torch` and `transformers`, and downloads `model` (T5-11B is ~45 GB).
    """
    try:
        from transformers import T5EncoderModel, T5TokenizerFast
    except ImportError as error:
        raise EngineError(
            f"embedding instructions needs the optional package transformers (pip install 'cosmos-edge[t5]'), "
            f"got ImportError: {error}"
        ) from error
    try:
        tokenizer = T5TokenizerFast.from_pretrained(model)
        # float32 like the official encoder (it loads with the default dtype); rounding to bf16 happens on write.
        encoder = T5EncoderModel.from_pretrained(model, use_safetensors=True)
    except OSError as error:  # not a local folder, and not found (or no network) on the Hub
        raise CheckpointError(f"model {model!r}: cannot load the T5 encoder: {error}") from None
    try:
        return _embed(tokenizer, encoder, instructions, out_path, device)
    except torch.OutOfMemoryError:  # T5-11B's encoder in float32 needs a large GPU
        raise EngineError(
            f"device {device}: out of memory for the T5 encoder {model!r} in float32; use a device with more memory"
        ) from None


def _embed(
    tokenizer: Any, encoder: Any, instructions: Sequence[str], out_path: str | Path, device: str
) -> TextEmbeddings:
    encoder = encoder.to(device=device, dtype=torch.float32).eval()
    embeddings = {}
    with torch.inference_mode():
        for text in instructions:
            tokens = tokenizer(
                [text], return_tensors="pt", truncation=True, padding="max_length", max_length=TEXT_TOKENS
            )
            mask = tokens.attention_mask.to(device)
            hidden = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
            hidden[0, int(mask.sum()) :] = 0
            embeddings[text] = hidden.float().cpu().numpy()
            if not torch.isfinite(hidden).all():  # the encoder's failure (fp16 overflow, bad weights)
                raise EngineError(f"the T5 encoder returned NaN or infinity for {text!r} on device {device}")
    store = TextEmbeddings.from_arrays(embeddings)
    write(out_path, store)
    return store


def _is_safetensors(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt"):
            return True
    except (SafetensorError, OSError):
        return False


def _load_tensor_pickle(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write before rejecting a plain pickle.dump file.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        if zipfile.is_zipfile(path):  # a zip archive, but not a torch.save one of tensors (an .npz, say)
            # torch's own message advises loading with weights_only=False, which must not be done with such a file.
            raise CheckpointError(
                f"{path}: a zip archive that is no torch.save archive of tensors (an .npz?); expected the official "
                "*_t5_embeddings.pkl"
            ) from None
        # Otherwise a plain pickle.dump file, not a torch.save archive: the official embeddings are written that way.

    def load_storage(data: bytes) -> object:
        # Storages pickle as torch.save bytes that record their device; map them to the CPU (CUDA may be absent).
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): load_storage,
        ("collections", "OrderedDict"): OrderedDict,
    }

    class TensorOnlyUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in allowed:
                raise CheckpointError(
                    f"{path}: refused, the pickle needs {module}.{name}, which is not a tensor-rebuild function "
                    f"(allowed: {sorted(f'{m}.{n}' for m, n in allowed)})"
                )
            return allowed[(module, name)]

    with path.open("rb") as file:
        try:
            return TensorOnlyUnpickler(file).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable pickle: {error}") from error
