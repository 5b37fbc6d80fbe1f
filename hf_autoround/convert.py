"""Module surgery: swap ``nn.Linear`` for ``QuantLinear`` (empty on meta for loading, or packed from a result)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import LayerPlan
from .quant_linear import LinearQuantSpec, QuantLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def replace_with_empty_quant_linears(model: nn.Module, plan: LayerPlan, dtype=None) -> None:
    """Pre-quantized load: every planned linear becomes a QuantLinear whose buffers the checkpoint will fill."""
    for name, scheme in plan.quantized.items():
        linear = model.get_submodule(name)
        spec = LinearQuantSpec(linear.in_features, linear.out_features, scheme, plan.packing_format)
        bias_dtype = linear.bias.dtype if linear.bias is not None else dtype
        with torch.device(linear.weight.device):
            layer = QuantLinear(spec, bias=linear.bias is not None, dtype=bias_dtype)
        set_submodule(model, name, layer)
