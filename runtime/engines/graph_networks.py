"""The network interfaces of `policy/api.py` over GraphRunners, on any engine backend (ONNX Runtime, TensorRT).

Graphs have static shapes, so each adapter holds one runner per shape it serves and picks it by the input shape:
DiTs by batch size (batch 1 among them, as every bundle has it), and a DiT batch of another size runs as slices of
the sizes loaded (`batch_slices`). Input and
output names come from each runner's GraphSpec. The adapters use their runners; whoever opened them closes them (the
loader, `runtime/bundle/loader.py`).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from cosmos_edge.runtime.engines.graph import GraphRunner
from cosmos_edge.runtime.errors import EngineError, InputError
from cosmos_edge.runtime.platforms import PlatformSpec
from cosmos_edge.runtime.policy.api import FloatArray, NetworkFn, StageTimer
from cosmos_edge.runtime.policy.images import preprocess_observation_images
from cosmos_edge.runtime.policy.latents import prefix_camera_frames


class _SingleIO:
    """A runner of a one-input, one-output graph (the VAE halves), names checked once."""

    def __init__(self, runner: GraphRunner) -> None:
        spec = runner.spec
        if len(spec.inputs) != 1 or len(spec.outputs) != 1:
            raise EngineError(f"graph {spec.name}: expected one input and one output, got {spec.input_names}")
        self.runner = runner
        self.shape = spec.inputs[0].shape
        self._names = (spec.input_names[0], spec.output_names[0])

    def __call__(self, array: np.ndarray) -> np.ndarray:
        source, target = self._names
        return self.runner.run({source: array})[target]


class GraphConditioning:
    """`ConditioningEncoder` over a `vae_encoder_cameras` graph: the official image transforms (numpy/Pillow), the
    camera frames of the conditioning prefix after its black frames, one graph call (the black frames' latent and
    causal context are constants inside the graph)."""

    def __init__(self, platform: PlatformSpec, runner: GraphRunner) -> None:
        self._platform = platform
        self._encoder = _SingleIO(runner)
        self._cameras = prefix_camera_frames(platform)
        if self._encoder.shape[2] != len(self._cameras):
            raise EngineError(
                f"graph {runner.spec.name}: expected {len(self._cameras)} camera frames for {platform.name}, "
                f"got input shape {list(self._encoder.shape)}"
            )

    def encode_conditioning(self, images: Mapping[str, np.ndarray], timer: StageTimer) -> np.ndarray:
        with timer.stage("preprocess"):
            planes = preprocess_observation_images(self._platform, images)
            video = np.stack([planes[camera] for camera in self._cameras], axis=1)[None]
        with timer.stage("vae_encode"):
            return self._encoder(video)


class GraphAutoencoder:
    """VideoAutoencoder over the whole-sequence encoder graph and the decoder graph, when a bundle has them (future
    images need both)."""

    def __init__(self, encoder: GraphRunner | None, decoder: GraphRunner | None) -> None:
        self._encoder = None if encoder is None else _SingleIO(encoder)
        self._decoder = None if decoder is None else _SingleIO(decoder)

    def encode(self, video: np.ndarray) -> np.ndarray:
        """ "1 3 f 224 224" → normalised latent, by the whole-sequence encoder graph."""
        if self._encoder is None or tuple(video.shape) != self._encoder.shape:
            loaded = None if self._encoder is None else list(self._encoder.shape)
            raise InputError(
                f"video: no encoder graph for shape {list(video.shape)}; loaded: {loaded} (future images need the "
                f"full-sequence encoder)"
            )
        return self._encoder(video)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        if self._decoder is None:
            raise EngineError("no VAE decoder graph loaded: open the bundle with future images to decode them")
        return self._decoder(latent)


class GraphDenoisingNetwork:
    """DenoisingNetwork over DiT graphs, one per batch size, with inputs (x, timesteps, condition_mask, text_k,
    text_v), and the text-K/V graph computing the last two from an instruction's embedding."""

    def __init__(self, text_kv: GraphRunner, runners: Sequence[GraphRunner]) -> None:
        kv_specs = text_kv.spec.outputs
        if len(text_kv.spec.inputs) != 1 or len(kv_specs) != 2:
            raise EngineError(f"graph {text_kv.spec.name}: expected text_embedding -> (text_k, text_v)")
        if not runners or any(runner.spec.inputs[3:] != kv_specs for runner in runners):
            raise EngineError(
                f"DiT graphs: expected at least one, each taking the {text_kv.spec.name} outputs {list(kv_specs)} "
                f"as its inputs 4 and 5, got {[runner.spec for runner in runners]}"
            )
        self._text_kv = text_kv
        self._runners = {runner.spec.inputs[0].shape[0]: runner for runner in runners}
        if 1 not in self._runners:  # what makes a batch of any size a sum of the sizes loaded
            raise EngineError(f"DiT graphs: expected batch 1 among them, got batches {sorted(self._runners)}")
        # One call at a time: runners own their I/O buffers, and a planning worker stopped by its deadline may still
        # be in its last call when the next query starts.
        self._calling = threading.Lock()
        # The instruction whose keys and values every DiT runner holds as constant inputs: the digest of its embedding.
        self._resident_text: bytes | None = None

    @property
    def batch_sizes(self) -> list[int]:
        return sorted(self._runners)

    def bind_text(self, text_embedding: np.ndarray) -> NetworkFn:
        """Computes the instruction's cross-attention keys and values (one text-K/V graph call, timed where the
        instruction is bound) and gives them to every DiT graph as constant inputs (uploaded once on device
        backends), unless they hold them already; a call after another instruction was bound does it again."""
        text_spec = self._text_kv.spec.inputs[0]
        text = np.ascontiguousarray(text_embedding, dtype=np.float32)
        if text.shape != text_spec.shape:
            raise InputError(f"text_embedding: expected shape {text_spec.shape} (the bundle's), got {text.shape}")

        # By content: the bindings of one instruction (the reactive policy's, the planner's) each hold their own
        # array, and switching between them must not compute and upload it again.
        digest = hashlib.blake2b(text.tobytes(), digest_size=16).digest()
        with self._calling:
            self._make_resident(text, digest)

        def run(batch: int, inputs: tuple[np.ndarray, ...]) -> np.ndarray:
            runner = self._runners[batch]
            return runner.run(dict(zip(runner.spec.input_names[:3], inputs, strict=True)))[runner.spec.output_names[0]]

        def network(x: FloatArray, timesteps: FloatArray, condition_mask: FloatArray) -> FloatArray:
            with self._calling:
                self._make_resident(text, digest)
                return call(x, timesteps, condition_mask)

        def call(x: FloatArray, timesteps: FloatArray, condition_mask: FloatArray) -> FloatArray:
            if x.shape[0] in self._runners:
                return run(x.shape[0], (x, timesteps, condition_mask))
            outputs = []
            for start, stop in batch_slices(x.shape[0], self.batch_sizes):
                outputs.append(run(stop - start, (x[start:stop], timesteps[start:stop], condition_mask[start:stop])))
            return np.concatenate(outputs)

        return network

    def _make_resident(self, text: np.ndarray, digest: bytes) -> None:
        """Every DiT runner holds the keys and values of `text` (whose digest is `digest`) once this returns."""
        if self._resident_text == digest:
            return
        self._resident_text = None  # until every runner holds the new keys and values
        spec = self._text_kv.spec
        text_kv = self._text_kv.run({spec.input_names[0]: text})
        for runner in self._runners.values():
            for name in spec.output_names:
                runner.set_constant_input(name, text_kv[name])
        self._resident_text = digest


def batch_slices(size: int, available: Sequence[int]) -> list[tuple[int, int]]:
    """(start, stop) covering `size` rows, each slice as many rows as the largest loaded batch that fits (`available`
    holds 1)."""
    sizes = sorted(available, reverse=True)
    slices, start = [], 0
    while start < size:
        batch = next(b for b in sizes if b <= size - start)
        slices.append((start, start + batch))
        start += batch
    return slices
