"""The precision names of the CLI, the bundle manifest and every backend."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "bf16")
