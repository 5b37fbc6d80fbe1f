"""Pure quantise / dequantise functions (DESIGN.md §4). No modules, no state: tensors in, tensors out.

Weights are ``[out, in]`` as in ``nn.Linear``; groups run along ``in``. A last partial group is zero-padded while
its scale is computed, exactly as the reference does, and the padding is dropped again afterwards.

asym:  wmin = min(min W, 0) * min_scale, wmax = max(max W, 0) * max_scale, s = (wmax - wmin) / (2^b - 1),
       zp = round(-wmin / s), q = clamp(round(W / s + V) + zp, 0, 2^b - 1), Ŵ = s * (q - zp)
sym ("full range"): m = the larger-magnitude side; s = -m / 2^(b-1) when that side is positive, +|m| / 2^(b-1)
       when negative, so the extreme weight always lands on code -2^(b-1); q = clamp(round(W / s + V), -2^(b-1),
       2^(b-1) - 1); stored with zero point 2^(b-1) so that codes are unsigned.
"""
from __future__ import annotations

import torch

from .scheme import QuantizedWeight, QuantScheme

SCALE_DTYPE = torch.float16
MIN_SCALE_MAGNITUDE = 1e-5


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return (x.round() - x).detach() + x


def to_groups(w: torch.Tensor, group_len: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out, n_groups, group_len]``, zero-padding the last group."""
    out_f, in_f = w.shape
    pad = (-in_f) % group_len
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(out_f, -1, group_len)


def from_groups(wg: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    return wg.reshape(wg.shape[0], -1)[:, :in_features]


def _clamp_magnitude(s: torch.Tensor) -> torch.Tensor:
    """Keep |s| >= MIN_SCALE_MAGNITUDE while preserving its sign (sym scales may be negative)."""
    return torch.where(s < 0, s.clamp(max=-MIN_SCALE_MAGNITUDE), s.clamp(min=MIN_SCALE_MAGNITUDE))


def group_params(wg: torch.Tensor, scheme: QuantScheme, min_scale=1.0, max_scale=1.0):
    """Scale and zero point per group of ``wg`` (``[out, n_groups, g]``) -> two ``[out, n_groups]`` tensors.

    ``min_scale`` / ``max_scale`` (scalars or ``[out, n_groups]``) shrink the range, as SignRound tunes them.
    The scale is rounded to SCALE_DTYPE inside the graph so tuning sees the scale that will be stored; the
    zero point is an integer-valued float (rounded with a straight-through estimator).
    """
    wmin = wg.amin(dim=-1).clamp(max=0) * min_scale
    wmax = wg.amax(dim=-1).clamp(min=0) * max_scale
    if scheme.sym:
        half = 2 ** (scheme.bits - 1)
        neg_dominates = (-wmin) > wmax
        m = torch.where(neg_dominates, -wmin, -wmax)
        scale = _clamp_magnitude((m / half).to(SCALE_DTYPE).to(wg.dtype))
        zero = torch.full_like(scale, float(half))
        return scale, zero
    both_zero = (wmin == 0) & (wmax == 0)
    wmin = torch.where(both_zero, -torch.ones_like(wmin), wmin)
    wmax = torch.where(both_zero, torch.ones_like(wmax), wmax)
    scale = ((wmax - wmin) / scheme.maxq).to(SCALE_DTYPE).to(wg.dtype).clamp(min=MIN_SCALE_MAGNITUDE)
    zero = round_ste(-wmin / scale).clamp(0, scheme.maxq)
    return scale, zero


def quantize_groups(wg, scale, zero, scheme: QuantScheme, v=None) -> torch.Tensor:
    """Unsigned integer codes (as float, straight-through rounded) for grouped weights."""
    x = wg / scale.unsqueeze(-1)
    if v is not None:
        x = x + v
    return (round_ste(x) + zero.unsqueeze(-1)).clamp(0, scheme.maxq)


def qdq(w: torch.Tensor, scheme: QuantScheme, v=None, min_scale=1.0, max_scale=1.0) -> torch.Tensor:
    """Quantise then dequantise ``w`` (``[out, in]``); differentiable through the straight-through estimator.

    ``v`` is SignRound's rounding perturbation, shaped like the grouped weight ``[out, n_groups, g]``.
    """
    wg = to_groups(w, scheme.group_len(w.shape[1]))
    scale, zero = group_params(wg, scheme, min_scale, max_scale)
    q = quantize_groups(wg, scale, zero, scheme, v)
    return from_groups((q - zero.unsqueeze(-1)) * scale.unsqueeze(-1), w.shape[1])


@torch.no_grad()
def quantize_weight(w: torch.Tensor, scheme: QuantScheme, v=None, min_scale=1.0, max_scale=1.0) -> QuantizedWeight:
    """Round ``w`` (``[out, in]``) to the integer grid and return it in unpacked checkpoint form."""
    w = w.float()
    wg = to_groups(w, scheme.group_len(w.shape[1]))
    scale, zero = group_params(wg, scheme, min_scale, max_scale)
    q = quantize_groups(wg, scale, zero, scheme, v)
    codes = from_groups(q, w.shape[1]).to(torch.int32)
    return QuantizedWeight(
        codes=codes.t().contiguous(),
        scales=scale.to(SCALE_DTYPE).t().contiguous(),
        zeros=zero.to(torch.int32).t().contiguous(),
        scheme=scheme,
    )


def dequantize_weight(qw: QuantizedWeight, dtype=torch.float32) -> torch.Tensor:
    """``[out, in]`` float weight from the unpacked form (computed in fp32, then cast)."""
    gidx = qw.group_index()
    scales = qw.scales.float().index_select(0, gidx)
    zeros = qw.zeros.float().index_select(0, gidx)
    w_t = (qw.codes.float() - zeros) * scales
    return w_t.t().to(dtype)
