"""Fused kernels, each beside its eager reference."""
