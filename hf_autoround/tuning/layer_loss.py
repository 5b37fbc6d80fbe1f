"""Per-layer quantisation error of a tuned block, for the quality report: for each planned linear, the MSE of its
output against the float layer's, on the input it sees inside the quantised block (the first sample of the block's
final forward: a batch cost 2 % of a block's time in ``benchmarks/block_time.py``, one sample's tokens are enough
for a report), with the plain RTN parameters (V = 0, full range) and with the kept (tuned) ones."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .input_hooks import InputHooks
from .signround import LayerParams


class FirstInputs(InputHooks):
    """Keeps the first sample of the first input each named submodule of ``block`` is called with."""

    def __init__(self, block: nn.Module, names):
        super().__init__(block, names)
        self.inputs: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        if name not in self.inputs:
            self.inputs[name] = x[:1]


@torch.no_grad()
def layer_losses(block: nn.Module, inputs: dict[str, torch.Tensor], targets: dict) -> dict[str, tuple[float, float]]:
    """name -> (output MSE with RTN parameters, with the kept parameters). ``block`` must still hold the
    fake-quantising wrappers of ``signround.wrapped`` (each with ``.linear`` and ``.params``)."""
    out = {}
    for name, x in inputs.items():
        wrapper = block.get_submodule(name)
        reference = F.linear(x, wrapper.linear.weight.to(x.dtype), wrapper.linear.bias)
        tuned = _mse(wrapper(x), reference)
        kept = wrapper.params
        wrapper.params = LayerParams.initial(wrapper.linear.weight, targets[name])
        try:
            rtn = _mse(wrapper(x), reference)
        finally:
            wrapper.params = kept
        out[name] = (rtn, tuned)
    return out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).pow(2).mean())
