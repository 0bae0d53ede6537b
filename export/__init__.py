"""Turns official checkpoints into a deployable bundle (ONNX graphs, TensorRT engines, manifest)."""
