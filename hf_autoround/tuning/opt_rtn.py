"""Optimised RTN (iters 0 with data): per-group range search weighted by how strongly each input channel is used.

For a linear with inputs ``x``, the output error of a weight error ``dW`` is ``sum_j h_j dW_ij^2`` to first order,
with ``h_j = sum over tokens of x_j^2``. For each group we pick the range shrink factors (``min_scale`` /
``max_scale``, the same tensors SignRound tunes) that minimise that weighted error, searched on a grid: first one
factor for both ends, then (asym only) each end on its own with the other fixed. Candidates are scored with the
fake-quantiser's forward (the values of ``qdq.qdq``) on the grouped weight, so nothing is regrouped per candidate.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..scheme import QuantScheme
from .fakequant import GroupedWeight, fake_quant_values
from .input_hooks import InputHooks
from .signround import LayerParams

GRID = torch.linspace(1.0, 0.4, 31).tolist()


class ActivationStats(InputHooks):
    """Accumulates ``sum(x^2)`` per input channel of the named linears of a block."""

    def __init__(self, block: nn.Module, names):
        super().__init__(block, names)
        self.sums: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        sq = x.float().pow(2).reshape(-1, x.shape[-1]).sum(0)
        self.sums[name] = sq if name not in self.sums else self.sums[name] + sq


def _search(g: GroupedWeight, scheme, h, v, fixed_min, fixed_max, which: str):
    """Best factor per group for ``which`` in ("both", "min", "max"); returns (min_scale, max_scale)."""
    best_err, best_min, best_max = None, fixed_min, fixed_max
    for f in GRID:
        mn = torch.full_like(fixed_min, f) if which in ("both", "min") else fixed_min
        mx = torch.full_like(fixed_max, f) if which in ("both", "max") else fixed_max
        w_hat, _ = fake_quant_values(g.wg, g.low, g.high, v, mn, mx, scheme.bits, scheme.sym)
        err = (g.wg - w_hat).pow_(2).mul_(h).sum(-1)
        if best_err is None:
            best_err, best_min, best_max = err, mn, mx
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_min = torch.where(better, mn, best_min)
        best_max = torch.where(better, mx, best_max)
    return best_min, best_max


@torch.no_grad()
def search_scales(weight: torch.Tensor, scheme: QuantScheme, act_sq: torch.Tensor) -> LayerParams:
    """Range factors for one linear from its weight ``[out, in]`` and ``act_sq`` ``[in]``; V stays 0."""
    g = GroupedWeight.from_weight(weight, scheme)
    h = GroupedWeight.from_weight(act_sq.float().unsqueeze(0), scheme).wg  # [1, n_groups, g], zero-padded
    params = LayerParams.initial(weight, scheme)
    mn, mx = _search(g, scheme, h, params.v, params.min_scale, params.max_scale, "both")
    if not scheme.sym:
        mn, mx = _search(g, scheme, h, params.v, mn, mx, "max")
        mn, mx = _search(g, scheme, h, params.v, mn, mx, "min")
    params.min_scale.copy_(mn)
    params.max_scale.copy_(mx)
    return params
