"""The GGUF grids as weight-level functions, for tuning (SignRound) to optimise exactly what a GGUF file stores.

A type's plain quantisation of a weight fixes its grid: the sub-block scales (and mins), double-quantised against
the super-block scales for the k-quants, as stored. ``GridWeight`` keeps that grid and re-chooses only the codes:
every block module's ``dequantize`` is affine in its code field ``q``, so each weight has its own ``value = a*q + b``
(``a``, ``b`` read off ``dequantize`` at ``q = 0`` and ``q = 1``), and the codes for a rounding perturbation ``v``
are ``clamp(round((w - b) / a + v))`` in the type's code range, with a straight-through gradient. The block
parameters ``GridWeight.params(w, v)`` carry those codes over the fixed scale fields; ``write_gguf(...,
params=...)`` packs them unchanged, so the tuned rounding is what lands in the file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType

from ...qdq import round_ste
from ._common import safe_inv
from .mixes import BLOCK_MODULES


def block_module(qtype):
    qtype = GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else qtype
    if qtype not in BLOCK_MODULES:
        raise ValueError(f"{qtype!r} is not a quantised GGUF type; expected one of "
                         f"{sorted(t.name.lower() for t in BLOCK_MODULES)}")
    return BLOCK_MODULES[qtype]


@dataclass
class GridWeight:
    """One ``[out, in]`` weight's fixed grid on a GGUF type: the block parameters of its plain quantisation
    (``fixed``; tuning replaces only ``q``) and, per weight, the affine map ``value = a * code + b``."""

    qtype: GGMLQuantizationType
    fixed: dict
    a: torch.Tensor
    b: torch.Tensor
    inv_a: torch.Tensor
    lo: int
    hi: int

    @classmethod
    @torch.no_grad()
    def of(cls, w: torch.Tensor, qtype) -> "GridWeight":
        mod = block_module(qtype)
        if w.dim() != 2 or w.shape[-1] % mod.BLOCK:
            raise ValueError(f"{mod.TYPE.name} needs rows that are multiples of {mod.BLOCK}, not {tuple(w.shape)}")
        fixed = mod.quantize(w.detach().float().reshape(-1, mod.BLOCK))
        b = mod.dequantize({**fixed, "q": torch.zeros_like(fixed["q"])}).reshape(w.shape)
        a = mod.dequantize({**fixed, "q": torch.ones_like(fixed["q"])}).reshape(w.shape) - b
        return cls(mod.TYPE, fixed, a, b, safe_inv(a), *mod.CODES)

    @property
    def name(self) -> str:
        return self.qtype.name.lower()

    def codes(self, w: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """``[out, in]`` codes of ``w`` on this grid (straight-through in ``v``, shaped like ``w``)."""
        x = (w.float() - self.b) * self.inv_a
        q = round_ste(x if v is None else x + v.reshape(x.shape)).clamp(self.lo, self.hi)
        # where a = 0 (an all-zero block) every code reads back the same: keep the plain quantisation's
        return torch.where(self.a == 0, self.fixed["q"].reshape(q.shape), q)

    def fake_quant(self, w: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        """The values the codes stand for (float32, differentiable in ``v``); equal to the file's values up to
        float rounding — :meth:`dequantize` gives them exactly."""
        return self.a * self.codes(w, v) + self.b

    @torch.no_grad()
    def params(self, w: torch.Tensor, v: torch.Tensor | None = None) -> dict:
        """Block parameters to write: the fixed scale fields with the codes for ``v``."""
        return {**self.fixed, "q": self.codes(w, v).reshape(self.fixed["q"].shape)}

    @torch.no_grad()
    def dequantize(self, params: dict) -> torch.Tensor:
        """What a GGUF reader computes from ``params`` (float32, ``[out, in]``)."""
        return block_module(self.qtype).dequantize(params).reshape(self.a.shape)


def block_params(w: torch.Tensor, qtype, v: torch.Tensor | None = None) -> dict:
    """Block parameters of ``w`` (``[out, in]``, ``in`` a multiple of the type's block); ``v`` shaped like ``w``."""
    return GridWeight.of(w, qtype).params(w, v)


def qdq(w: torch.Tensor, qtype, v: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` quantised to the type's grid and dequantised exactly as stored (float32, shape of ``w``)."""
    grid = GridWeight.of(w, qtype)
    return grid.dequantize(grid.params(w, v))
