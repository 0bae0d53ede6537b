"""Hand-written fused kernels, each beside its eager reference, a guarded dispatcher and a parity test.

Empty so far: on the H100 the DiT is GEMM-bound, `torch.compile` (inductor's fused kernels) already gives 1.8×
on it, and TensorRT fuses the attention of the exported graphs. A kernel lands here once a measurement shows it pays.
"""
