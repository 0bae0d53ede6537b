"""ONNX export of the DiT and of the Wan VAE encoder and decoder: one static-shape graph per `GraphSpec`.

Exporter: torch's TorchScript-based `torch.onnx.export(..., dynamo=False)` at opset 17 (torch 2.13, onnx 1.23).
The dynamo exporter needs onnxscript, which is not a dependency, and lowers SDPA to the opset-23 `Attention` op,
which only TensorRT >= 10.14 parses; the explicit MatMul -> Softmax -> MatMul of `dit.explicit_attention` is fused
by every TensorRT 10 release and runs on every ONNX Runtime. Opset 17 is the first with LayerNormalization.

What makes the graphs fusable and portable (deployment_anchors D.4, E.2):
  * static shapes: every input shape comes from the GraphSpec, no dynamic axes;
  * RoPE as constant cos/sin tables (`DiTGraph`), not the arange/outer/cos/sin that build them; no complex numbers;
  * the instruction's cross-attention keys and values as DiT inputs, computed by a separate per-instruction graph
    (`TextKVGraph`), so a DiT call does not project them again (runners hold them as constant inputs);
  * DiT attention in export mode (`dit.explicit_attention_mode`): the 1/sqrt(d) scale multiplies Q before the
    first MatMul and nothing sits between that MatMul and the Softmax;
  * float32 at every boundary, the bundle precision inside: the wrappers below cast on entry and exit (a bf16
    bundle's VAE computes in float32: opset 17 has no bfloat16 Conv, `runtime.precision.vae_graph_precision`).

The Wan VAE's single-head attention (head dim 384, beyond TensorRT's fused-MHA limit of 256) keeps SDPA, which
the exporter writes as MatMul/Softmax/MatMul with sqrt(scale) on both Q and K. Graphs whose weights exceed
`EXTERNAL_DATA_BYTES` keep them in one external-data file beside the graph (protobuf stops at 2 GiB).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import Tensor, nn

from cosmos_edge.runtime.engines.graph import GraphSpec, check_signature
from cosmos_edge.runtime.models.dit import CosmosDiT, CrossAttentionKV, explicit_attention_mode
from cosmos_edge.runtime.models.prefix_encoder import BlackPrefixEncoder
from cosmos_edge.runtime.models.wan_vae import WanVAE
from cosmos_edge.runtime.platforms import PlatformSpec

_LOG = logging.getLogger(__name__)

OPSET = 17
# Protobuf refuses messages over 2 GiB; weights past 1 GiB go to external data so the graph itself always fits.
EXTERNAL_DATA_BYTES = 1 << 30


class DiTGraph(nn.Module):
    """The DiT with the graph boundary of `runtime.engines.graph.dit_graph`; it casts its inputs to the weights' dtype.

    The RoPE tables of the spec's patch grid are computed here, before tracing, and registered as (persistent:
    the tracer lifts only state-dict tensors) buffers: the trace then records them once, as two initializers shared
    by every block, not as the ops that built them nor as one constant copy per use.
    """

    def __init__(self, dit: CosmosDiT, spec: GraphSpec) -> None:
        super().__init__()
        self.dit = dit
        _, _, frames, height, width = spec.inputs[0].shape
        pt, ps = dit.config.patch_temporal, dit.config.patch_spatial
        grid = (frames // pt, height // ps, width // ps)
        cos, sin = dit.rope(grid, dit.final_layer.linear.weight.device)  # the tensors of the DiT's own cache
        self.register_buffer("rope_cos", cos)
        self.register_buffer("rope_sin", sin)

    def forward(self, x: Tensor, timesteps: Tensor, condition_mask: Tensor, text_k: Tensor, text_v: Tensor) -> Tensor:
        dtype = self.dit.dtype  # the keys and values the text-K/V graph computed in it: the cast back is exact
        return self.dit(x, timesteps, condition_mask, CrossAttentionKV(text_k.to(dtype), text_v.to(dtype))).float()


class TextKVGraph(nn.Module):
    """The cross-attention keys and values of every block for one instruction (`runtime.engines.graph.text_kv_graph`),
    in the weights' dtype inside and float32 at the boundary (a widening: exact)."""

    def __init__(self, dit: CosmosDiT) -> None:
        super().__init__()
        self.dit = dit

    def forward(self, text_embedding: Tensor) -> tuple[Tensor, Tensor]:
        text_kv = self.dit.precompute_text_kv(text_embedding)
        return text_kv.k.float(), text_kv.v.float()


class VAEEncoderGraph(nn.Module):
    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, video: Tensor) -> Tensor:
        return self.vae.encode(video.to(self.vae.latent_mean.dtype)).float()


class VAECamerasEncoderGraph(nn.Module):
    """The conditioning prefix's latents from its camera frames. The black frames every clip opens with are encoded
    before tracing: their latent and the causal context the camera frames continue from become constants of the
    graph, so each query encodes only its camera frames."""

    def __init__(self, vae: WanVAE, platform: PlatformSpec) -> None:
        super().__init__()
        self.encoder = BlackPrefixEncoder(vae, platform)
        self.dtype = vae.latent_mean.dtype

    def forward(self, video: Tensor) -> Tensor:
        return self.encoder(video.to(self.dtype)).float()


class VAEDecoderGraph(nn.Module):
    def __init__(self, vae: WanVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: Tensor) -> Tensor:
        return self.vae.decode(latent.to(self.vae.latent_mean.dtype)).float()


@dataclass(frozen=True)
class ExportedGraph:
    """Files written for one graph; `external_data` is None when the weights are inside `path`."""

    spec: GraphSpec
    path: Path
    external_data: Path | None


def export_dit(dit: CosmosDiT, spec: GraphSpec, path: Path) -> ExportedGraph:
    """Exports `dit` for the input shapes of `spec` (a `dit_graph`), with constant RoPE tables and fusable attention."""
    with explicit_attention_mode(dit):
        return export_graph(DiTGraph(dit, spec), spec, path)


def export_text_kv(dit: CosmosDiT, spec: GraphSpec, path: Path) -> ExportedGraph:
    """Exports the per-instruction part of the DiT: the cross-attention keys and values (`spec`: a `text_kv_graph`)."""
    return export_graph(TextKVGraph(dit), spec, path)


def export_vae_encoder(vae: WanVAE, spec: GraphSpec, path: Path) -> ExportedGraph:
    """The whole-sequence encoder."""
    return export_graph(VAEEncoderGraph(vae), spec, path)


def export_vae_cameras_encoder(vae: WanVAE, platform: PlatformSpec, spec: GraphSpec, path: Path) -> ExportedGraph:
    """The conditioning prefix encoder of `platform`, from its camera frames."""
    return export_graph(VAECamerasEncoderGraph(vae, platform), spec, path)


def export_vae_decoder(vae: WanVAE, spec: GraphSpec, path: Path) -> ExportedGraph:
    return export_graph(VAEDecoderGraph(vae), spec, path)


def export_graph(module: nn.Module, spec: GraphSpec, path: Path) -> ExportedGraph:
    """Traces `module` on zeros of the spec's shapes, writes `path` (+ `path.data` when large) and checks it."""
    start = time.perf_counter()
    sample = tuple(torch.from_numpy(tensor.zeros()) for tensor in spec.inputs)
    traced: list[tuple[Tensor, ...]] = []  # what the traced forward returned: the graph's true outputs
    hook = module.register_forward_hook(
        lambda _module, _inputs, output: traced.append(output if isinstance(output, tuple) else (output,))
    )
    # The exporter writes large models as one file per tensor; export into scratch space, then consolidate.
    with tempfile.TemporaryDirectory(prefix=f"{spec.name}-", dir=path.parent) as scratch:
        raw = Path(scratch) / "graph.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # Tracer warnings flag the networks' shape checks, which are constant in a static-shape export.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # torch 2.13 flags the TorchScript exporter as legacy; it is the deliberate choice (module docstring).
            warnings.simplefilter("ignore", DeprecationWarning)
            # Strided slices (the VAE's 2x temporal downsampling) stay Slice ops instead of being folded; harmless.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1", category=UserWarning)
            try:
                torch.onnx.export(
                    module.eval(),
                    sample,
                    str(raw),
                    input_names=spec.input_names,
                    output_names=spec.output_names,
                    opset_version=OPSET,
                    do_constant_folding=True,
                    dynamo=False,
                )
            finally:
                hook.remove()
        # The file's output shapes are written from the spec (the tracer leaves some unknown): checked here first.
        found = {
            tensor.name: (tuple(output.shape), str(output.dtype).removeprefix("torch."))
            for tensor, output in zip(spec.outputs, traced[0], strict=True)
        }
        check_signature(spec, found, False, f"{path} (traced)")
        external = _save_consolidated(raw, spec, path)
    # By path: also valid for graphs with external data; the full check infers types, where an operator without a
    # kernel for a dtype (opset 17's Conv in bfloat16) shows at export rather than when a runtime loads the graph.
    onnx.checker.check_model(str(path), full_check=True)
    _check_io(path, spec)
    seconds = time.perf_counter() - start
    _LOG.info("exported %s in %.1f s (%s)", path.name, seconds, _size_text(path, external))
    return ExportedGraph(spec, path, external)


def _save_consolidated(raw: Path, spec: GraphSpec, path: Path) -> Path | None:
    """Saves the exported graph at `path` with the spec's output shapes, its weights in one `path.data` if large."""
    model = onnx.load(str(raw))  # also reads the per-tensor files the exporter writes for large models
    # The tracer leaves the shapes of outputs computed through Shape ops unknown; the spec states them.
    for value, tensor in zip(model.graph.output, spec.outputs, strict=True):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in tensor.shape:
            dims.add().dim_value = size
    if sum(file.stat().st_size for file in raw.parent.iterdir()) <= EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path))
        return None
    external = path.with_name(path.name + ".data")
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=external.name)
    return external


def _check_io(path: Path, spec: GraphSpec) -> None:
    """The exported I/O must be exactly the spec's: names, float32, static shapes."""
    graph = onnx.load(str(path), load_external_data=False).graph
    for inputs, values in ((True, graph.input), (False, graph.output)):
        found = {value.name: (_shape(value), _dtype(value)) for value in values}
        check_signature(spec, found, inputs, f"{path} (exported)")


def _dtype(value: onnx.ValueInfoProto) -> str:
    return str(onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))


def _shape(value: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(dim.dim_value for dim in value.type.tensor_type.shape.dim)


def _size_text(path: Path, external: Path | None) -> str:
    total = path.stat().st_size + (external.stat().st_size if external is not None else 0)
    return f"{total / 2**20:.1f} MiB" + (", external data" if external is not None else "")
