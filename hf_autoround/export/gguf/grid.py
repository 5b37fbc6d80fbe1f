"""The GGUF grids as weight-level functions, for tuning (SignRound) to optimise exactly what a GGUF file stores.

``qdq(w, "q4_k", v)`` fake-quantises a ``[out, in]`` weight on a type's grid — the sub-block scales and mins
double-quantised against the super-block scales, as stored — differentiably in ``v`` (straight-through rounding).
``block_params(w, "q4_k", v)`` returns the block parameters that ``write_gguf(..., params=...)`` packs unchanged,
so the tuned rounding is what lands in the file.
"""
from __future__ import annotations

import torch
from gguf import GGMLQuantizationType

from .mixes import BLOCK_MODULES


def block_module(qtype):
    qtype = GGMLQuantizationType[qtype.upper()] if isinstance(qtype, str) else qtype
    if qtype not in BLOCK_MODULES:
        raise ValueError(f"{qtype!r} is not a quantised GGUF type; expected one of "
                         f"{sorted(t.name.lower() for t in BLOCK_MODULES)}")
    return BLOCK_MODULES[qtype]


def block_params(w: torch.Tensor, qtype, v: torch.Tensor | None = None) -> dict:
    """Block parameters of ``w`` (``[out, in]``, ``in`` a multiple of the type's block); ``v`` shaped like ``w``."""
    mod = block_module(qtype)
    if w.shape[-1] % mod.BLOCK:
        raise ValueError(f"{mod.TYPE.name} needs rows that are multiples of {mod.BLOCK}, not {w.shape[-1]}")
    blocks = w.float().reshape(-1, mod.BLOCK)
    return mod.quantize(blocks, None if v is None else v.reshape(blocks.shape))


def qdq(w: torch.Tensor, qtype, v: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` quantised to the type's grid and dequantised (float32, shape of ``w``)."""
    return block_module(qtype).dequantize(block_params(w, qtype, v)).reshape(w.shape)
