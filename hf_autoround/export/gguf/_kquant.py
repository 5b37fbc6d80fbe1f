"""The two-level ("super-group") quantisation shared by the k-quants: a 256-weight super-block is split into
sub-blocks; each sub-block's scale (and min) is itself quantised to a few bits against one fp16 super-scale per
super-block (``d``, and ``dmin`` for the mins). Codes are computed against the *stored* (double-quantised) scales,
so the dequantised weight is exactly what a GGUF reader gets back.
"""
from __future__ import annotations

import torch

from ._common import fp16, rnd, safe_inv

QK_K = 256


def _pick(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The element of largest magnitude along ``dim``, with its sign."""
    return torch.gather(x, dim, x.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def asym(x: torch.Tensor, sub: int, qmax: int, smax: int, v=None) -> dict:
    """``w = (d*sc) * q - (dmin*m)`` with q in 0..qmax and sc, m in 0..smax per sub-block of ``sub`` weights."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, sub)
    lo = xs.amin(-1).clamp(max=0)
    hi = xs.amax(-1).clamp(min=0)
    scale, mn = (hi - lo) / qmax, -lo
    d = fp16(scale.amax(-1, keepdim=True) / smax)
    dmin = fp16(mn.amax(-1, keepdim=True) / smax)
    sc = (scale * safe_inv(d)).round().clamp(0, smax)
    m = (mn * safe_inv(dmin)).round().clamp(0, smax)
    eff_d, eff_m = (d * sc).unsqueeze(-1), (dmin * m).unsqueeze(-1)
    vs = None if v is None else v.reshape(xs.shape)
    q = rnd((xs + eff_m) * safe_inv(eff_d), vs).clamp(0, qmax)
    return {"d": d, "dmin": dmin, "sc": sc, "m": m, "q": q.reshape(nb, -1)}


def asym_dequantize(p: dict, sub: int) -> torch.Tensor:
    nb = p["q"].shape[0]
    eff_d = (p["d"] * p["sc"]).unsqueeze(-1)
    eff_m = (p["dmin"] * p["m"]).unsqueeze(-1)
    return (eff_d * p["q"].reshape(nb, -1, sub) - eff_m).reshape(nb, -1)


def sym(x: torch.Tensor, sub: int, qneg: int, sneg: int, v=None) -> dict:
    """``w = (d*sc) * q`` with q in -qneg..qneg-1 and signed sc in -sneg..sneg-1 per sub-block ("full range": the
    largest-magnitude weight of a sub-block maps to -qneg, the largest-magnitude scale to -sneg)."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, sub)
    scale = _pick(xs) / -qneg
    d = fp16(_pick(scale).unsqueeze(-1) / -sneg)
    sc = (scale * safe_inv(d)).round().clamp(-sneg, sneg - 1)
    eff = (d * sc).unsqueeze(-1)
    vs = None if v is None else v.reshape(xs.shape)
    q = rnd(xs * safe_inv(eff), vs).clamp(-qneg, qneg - 1)
    return {"d": d, "sc": sc, "q": q.reshape(nb, -1)}


def sym_dequantize(p: dict, sub: int) -> torch.Tensor:
    nb = p["q"].shape[0]
    return ((p["d"] * p["sc"]).unsqueeze(-1) * p["q"].reshape(nb, -1, sub)).reshape(nb, -1)


def pack_scales_6bit(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins -> 12 bytes (Q4_K / Q5_K): bytes 0-3 hold sc[0..3] in their low six
    bits and the top two bits of sc[4..7] above; bytes 4-7 the same for the mins; bytes 8-11 the low nibbles of
    sc[4..7] (low) and m[4..7] (high)."""
    sc, m = sc.to(torch.int64), m.to(torch.int64)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return torch.cat([first, second, third], dim=-1).to(torch.uint8)
