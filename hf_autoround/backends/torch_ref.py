"""The plain-torch reference kernel: unpack -> dequantise (fp32) -> ``F.linear``. Every backend, any bits/format."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..qdq import dequantize_weight


class TorchReferenceKernel:
    name = "torch"

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = dequantize_weight(layer.unpack(), dtype=x.dtype)
        bias = layer.bias.to(x.dtype) if layer.bias is not None else None
        return F.linear(x, w, bias)
