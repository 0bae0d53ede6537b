"""Device kernels, each with an exact reference in the policy layer and a parity test against it.

`image_transforms`: the official image preprocessing as torch ops (reference: `runtime/policy/images.py`, numpy and
Pillow), so the torch backend preprocesses on its device. The DiT itself needs no hand-written kernel so far: it is
GEMM-bound, `torch.compile` fuses the rest, and TensorRT fuses the attention of the exported graphs.
"""
