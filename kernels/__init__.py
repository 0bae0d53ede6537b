"""Device kernels, each beside its exact reference and a parity test.

`image_transforms`: the official image preprocessing as torch ops (reference: `runtime/policy/images.py`, numpy and
Pillow), so the torch backend preprocesses on its device. The DiT itself needs no hand-written kernel so far: it is
GEMM-bound, `torch.compile` fuses the rest, and TensorRT fuses the attention of the exported graphs.
"""
