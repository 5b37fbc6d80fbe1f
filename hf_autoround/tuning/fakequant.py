"""A fused fake-quantiser for tuning: the forward values of ``qdq.qdq`` with a hand-written backward.

``qdq.qdq`` through autograd builds ~10 temporaries per weight and ~15 more in the backward; on CPU those big
allocations (and their page faults) cost as much as the block's matmuls. ``FakeQuant`` computes the same values in
the same order (so ``quantize_weight`` later stores exactly what was tuned) from constants prepared once per layer
(the zero-padded grouped weight and its per-group min / max), and writes the straight-through gradients directly:

    x = W/s + V, r = round(x), q = clamp(r + z, 0, maxq), Ŵ = (q - z) s
    dV = G s [0 <= r+z <= maxq]                                   (rounding passes the gradient straight through)
    ds = Σ_g G (q - z) - Σ_g dV W / s²  (+ the zero-point path for asym: z = clamp(round(-wmin/s)))
    s from min/max: sym s = m / 2^(b-1), m the larger-magnitude side; asym s = (wmax - wmin) / maxq.
One difference from autograd through ``qdq``: the scale gradient is kept in fp32 (autograd rounds it through the
fp16 cast of the scale, flushing tiny gradients to zero, which would freeze the min/max tuning of quiet groups).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..qdq import MIN_SCALE_MAGNITUDE, SCALE_DTYPE, to_groups
from ..scheme import QuantScheme


@dataclass
class GroupedWeight:
    """Per-layer constants: ``wg`` ``[out, n_groups, g]`` (zero-padded), ``low`` / ``high`` ``[out, n_groups]``."""

    wg: torch.Tensor
    low: torch.Tensor  # min(min W, 0)
    high: torch.Tensor  # max(max W, 0)
    in_features: int

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scheme: QuantScheme) -> "GroupedWeight":
        w = weight.detach().float()
        wg = to_groups(w, scheme.group_len(w.shape[1])).contiguous()
        return cls(wg, wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0), w.shape[1])


def _sym_scale(low, high, mn, mx, bits):
    wmin, wmax = low * mn, high * mx
    half = 2 ** (bits - 1)
    neg = (-wmin) > wmax
    s16 = (torch.where(neg, -wmin, -wmax) / half).to(SCALE_DTYPE).to(torch.float32)
    scale = torch.where(s16 < 0, s16.clamp(max=-MIN_SCALE_MAGNITUDE), s16.clamp(min=MIN_SCALE_MAGNITUDE))
    passes = (s16 <= -MIN_SCALE_MAGNITUDE) | (s16 >= MIN_SCALE_MAGNITUDE)
    return scale, torch.full_like(scale, float(half)), (neg, passes)


def _asym_scale(low, high, mn, mx, maxq):
    wmin, wmax = low * mn, high * mx
    both_zero = (wmin == 0) & (wmax == 0)
    wmin = torch.where(both_zero, -torch.ones_like(wmin), wmin)
    wmax = torch.where(both_zero, torch.ones_like(wmax), wmax)
    s16 = ((wmax - wmin) / maxq).to(SCALE_DTYPE).to(torch.float32)
    scale = s16.clamp(min=MIN_SCALE_MAGNITUDE)
    z_raw = (-wmin / scale).round()
    zero = z_raw.clamp(0, maxq)
    return scale, zero, (both_zero, s16 >= MIN_SCALE_MAGNITUDE, wmin, (z_raw >= 0) & (z_raw <= maxq))


def fake_quant_values(wg, low, high, v, mn, mx, bits: int, sym: bool):
    """Grouped fake-quantised weight ``[out, n_groups, g]`` and what the backward needs (no autograd)."""
    maxq = 2**bits - 1
    if sym:
        scale, zero, aux = _sym_scale(low, high, mn, mx, bits)
    else:
        scale, zero, aux = _asym_scale(low, high, mn, mx, maxq)
    s = scale.unsqueeze(-1)
    r = torch.addcdiv(v, wg, s).round_()  # round(W/s + V)
    # inside: r + z within [0, maxq] (the clamp left it alone), where the rounding's gradient passes
    if sym:  # z = 2^(b-1) everywhere: clamp(r + z, 0, maxq) - z = clamp(r, -z, maxq - z)
        half = 2 ** (bits - 1)
        q_minus_z = r.clamp(-half, maxq - half)
        inside = q_minus_z == r
    else:
        z = zero.unsqueeze(-1)
        rz = r.add_(z)
        q = rz.clamp(0, maxq)
        inside = q == rz
        q_minus_z = q.sub_(z)
    return q_minus_z * s, (scale, zero, inside, q_minus_z, *aux)


class FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, wg, low, high, v, mn, mx, bits: int, sym: bool):
        out, saved = fake_quant_values(wg, low, high, v, mn, mx, bits, sym)
        ctx.save_for_backward(wg, low, high, *saved)
        ctx.bits, ctx.sym = bits, sym
        return out

    @staticmethod
    def backward(ctx, grad):
        wg, low, high, scale, zero, inside, q_minus_z, *aux = ctx.saved_tensors
        s = scale.unsqueeze(-1)
        dv = grad * s
        dv.mul_(inside)
        need_scales = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
        if not need_scales:
            return None, None, None, dv, None, None, None, None
        ds = (grad * q_minus_z).sum(-1) - (dv * wg).sum(-1) / (scale * scale)
        if ctx.sym:
            dmin, dmax = _sym_backward(ds, scale, aux, ctx.bits)
        else:
            dz = dv.sum(-1) - scale * grad.sum(-1)
            dmin, dmax = _asym_backward(ds, dz, scale, aux, 2**ctx.bits - 1)
        return None, None, None, dv, dmin * low, dmax * high, None, None


def _sym_backward(ds, scale, aux, bits):
    neg, passes = aux
    dm = ds * passes / 2 ** (bits - 1)
    return torch.where(neg, -dm, torch.zeros_like(dm)), torch.where(neg, torch.zeros_like(dm), -dm)


def _asym_backward(ds, dz, scale, aux, maxq):
    both_zero, passes, wmin, z_inside = aux
    dz_raw = dz * z_inside  # z = clamp(round_ste(-wmin / s))
    ds = ds + dz_raw * wmin / (scale * scale)
    dwmin = -dz_raw / scale
    ds16 = ds * passes
    dwmin = (dwmin - ds16 / maxq) * ~both_zero
    dwmax = (ds16 / maxq) * ~both_zero
    return dwmin, dwmax


def fake_quant(g: GroupedWeight, scheme: QuantScheme, v, min_scale, max_scale) -> torch.Tensor:
    """``[out, in]`` fake-quantised weight (same values as ``qdq.qdq`` on the original weight)."""
    out = FakeQuant.apply(g.wg, g.low, g.high, v, min_scale, max_scale, scheme.bits, scheme.sym)
    out = out.reshape(out.shape[0], -1)
    return out if out.shape[1] == g.in_features else out[:, :g.in_features]
