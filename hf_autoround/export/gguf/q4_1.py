"""Q4_1: blocks of 32, ``w = d * q + m``, q in 0..15 (asymmetric: m is the block minimum).

Layout (20 bytes): d fp16 | m fp16 | qs[16]: byte j = q[j] (low nibble) | q[j + 16] (high nibble).
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from ._common import fp16, fp16_bytes, rnd, safe_inv, to_numpy, u8

TYPE = GGMLQuantizationType.Q4_1
BLOCK = 32
CODES = (0, 15)  # range of the stored code field "q"


def quantize(x: torch.Tensor, v=None) -> dict:
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    d, m = fp16((hi - lo) / 15), fp16(lo)
    q = rnd((x - m) * safe_inv(d), v).clamp(0, 15)
    return {"d": d, "m": m, "q": q}


def dequantize(p: dict) -> torch.Tensor:
    return p["d"] * p["q"] + p["m"]


def pack(p: dict):
    q = u8(p["q"])
    return to_numpy([fp16_bytes(p["d"]), fp16_bytes(p["m"]), q[:, :16] | (q[:, 16:] << 4)])
