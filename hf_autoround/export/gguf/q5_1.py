"""Q5_1: blocks of 32, ``w = d * q + m``, q in 0..31 (asymmetric: m is the block minimum).

Layout (24 bytes): d fp16 | m fp16 | qh[4] | qs[16], the 5-bit codes split as in Q5_0.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from ._common import fp16, fp16_bytes, rnd, safe_inv, to_numpy
from .q5_0 import pack_5bit

TYPE = GGMLQuantizationType.Q5_1
BLOCK = 32
CODES = (0, 31)  # range of the stored code field "q"


def quantize(x: torch.Tensor, v=None) -> dict:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d, m = fp16((hi - lo) / 31), fp16(lo)
    q = rnd((x - m) * safe_inv(d), v).clamp(0, 31)
    return {"d": d, "m": m, "q": q}


def dequantize(p: dict) -> torch.Tensor:
    return p["d"] * p["q"] + p["m"]


def pack(p: dict):
    return to_numpy([fp16_bytes(p["d"]), fp16_bytes(p["m"])] + pack_5bit(p["q"]))
