"""The torch dtype of each precision name."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from cosmos_edge.runtime.precision import PRECISIONS

TORCH_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    dict(zip(PRECISIONS, (torch.float32, torch.float16, torch.bfloat16), strict=True))
)
