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


CHUNK = 2048  # super-blocks per search step (bounds the [blocks, candidates, weights] temporaries)


def _weighted_fit(xs, w, levels, asym_: bool):
    """Least-squares ``scale`` (and ``offset`` <= 0) with ``scale * levels + offset ~ xs`` under weights ``w``;
    returns (scale, offset, weighted squared error), reduced over the last dim."""
    sw, sl, sll = w.sum(-1), (w * levels).sum(-1), (w * levels * levels).sum(-1)
    sx, sxl = (w * xs).sum(-1), (w * xs * levels).sum(-1)
    if asym_:
        det = sw * sll - sl * sl
        ok = det > 0
        scale = torch.where(ok, (sw * sxl - sx * sl) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
        offset = torch.where(ok, (sll * sx - sl * sxl) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
        positive = offset > 0  # the stored min is subtracted: offsets above zero are not representable
        only_scale = torch.where(sll > 0, sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), torch.zeros_like(sll))
        scale = torch.where(positive, only_scale, scale)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
    else:
        scale = torch.where(sll > 0, sxl / torch.where(sll > 0, sll, torch.ones_like(sll)), torch.zeros_like(sll))
        offset = torch.zeros_like(scale)
    err = (w * (scale.unsqueeze(-1) * levels + offset.unsqueeze(-1) - xs) ** 2).sum(-1)
    return scale, offset, err


def _search_asym(xs: torch.Tensor, qmax: int, rmin: float, rdelta: float, nstep: int):
    """Per sub-block (scale, -min) chosen among ``nstep + 1`` candidate grids by weighted least squares, in the
    manner of ggml's reference k-quant search; weights favour large-magnitude values."""
    lo = xs.amin(-1).clamp(max=0)
    hi = xs.amax(-1)
    rms = xs.pow(2).mean(-1, keepdim=True).sqrt()
    w = rms + xs.abs()
    span = (hi - lo).clamp(min=1e-30)
    best_scale, best_min = (hi - lo) / qmax, -lo
    best_err = (w * ((xs - lo.unsqueeze(-1)) - best_scale.unsqueeze(-1)
                     * ((xs - lo.unsqueeze(-1)) / best_scale.clamp(min=1e-30).unsqueeze(-1)).round().clamp(0, qmax)) ** 2).sum(-1)
    for k in range(nstep + 1):
        iscale = (qmax + rmin + rdelta * k) / span
        levels = ((xs - lo.unsqueeze(-1)) * iscale.unsqueeze(-1)).round().clamp(0, qmax)
        scale, offset, err = _weighted_fit(xs, w, levels, asym_=True)
        better = (err < best_err) & (scale > 0)
        best_scale = torch.where(better, scale, best_scale)
        best_min = torch.where(better, -offset, best_min)
        best_err = torch.where(better, err, best_err)
    return best_scale, best_min


def _search_sym(xs: torch.Tensor, qneg: int, nstep: int = 9):
    """Per sub-block signed scale: candidate grids around "full range" refitted by weighted least squares."""
    mx = _pick(xs)
    w = xs.pow(2)
    base = mx / -qneg
    safe = torch.where(base == 0, torch.ones_like(base), base)
    levels = (xs / safe.unsqueeze(-1)).round().clamp(-qneg, qneg - 1)
    best_scale = base
    best_err = (w * (base.unsqueeze(-1) * levels - xs) ** 2).sum(-1)
    for k in range(-nstep, nstep + 1):
        iscale = -(qneg + 0.1 * k) / torch.where(mx == 0, torch.ones_like(mx), mx)
        levels = (xs * iscale.unsqueeze(-1)).round().clamp(-qneg, qneg - 1)
        scale, _, err = _weighted_fit(xs, w, levels, asym_=False)
        better = (err < best_err) & (mx != 0)
        best_scale = torch.where(better, scale, best_scale)
        best_err = torch.where(better, err, best_err)
    return best_scale


def _chunked(fn, xs, *args):
    outs = [fn(xs[i:i + CHUNK], *args) for i in range(0, xs.shape[0], CHUNK)]
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*outs))
    return torch.cat(outs)


def asym(x: torch.Tensor, sub: int, qmax: int, smax: int, v=None, search=(-1.0, 0.1, 20)) -> dict:
    """``w = (d*sc) * q - (dmin*m)`` with q in 0..qmax and sc, m in 0..smax per sub-block of ``sub`` weights.
    ``search`` = (rmin, rdelta, nstep) of the candidate grids for each sub-block's scale and min (None: min/max)."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, sub)
    if search is None:
        lo = xs.amin(-1).clamp(max=0)
        scale, mn = (xs.amax(-1).clamp(min=0) - lo) / qmax, -lo
    else:
        with torch.no_grad():
            scale, mn = _chunked(_search_asym, xs.detach(), qmax, *search)
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


def sym(x: torch.Tensor, sub: int, qneg: int, sneg: int, v=None, search: bool = True) -> dict:
    """``w = (d*sc) * q`` with q in -qneg..qneg-1 and signed sc in -sneg..sneg-1 per sub-block (the sub-block
    scale: "full range", or with ``search`` the best of candidate grids around it; the largest-magnitude scale
    maps to -sneg)."""
    nb = x.shape[0]
    xs = x.reshape(nb, -1, sub)
    if search:
        with torch.no_grad():
            scale = _chunked(_search_sym, xs.detach(), qneg)
    else:
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
