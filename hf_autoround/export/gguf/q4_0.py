"""Q4_0: blocks of 32, ``w = d * (q - 8)``, q in 0..15 (symmetric, "full range": the largest-magnitude weight maps
to code 0, so ``d = that weight / -8``).

Layout (18 bytes): d fp16 | qs[16]: byte j = q[j] (low nibble) | q[j + 16] (high nibble).
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from ._common import fp16, fp16_bytes, fp16_from_bytes, rnd, safe_inv, to_numpy, u8

TYPE = GGMLQuantizationType.Q4_0
BLOCK = 32
CODES = (0, 15)  # range of the stored code field "q"


def quantize(x: torch.Tensor, v=None) -> dict:
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d = fp16(torch.gather(x, -1, idx) / -8)
    q = (rnd(x * safe_inv(d), v) + 8).clamp(0, 15)
    return {"d": d, "q": q}


def dequantize(p: dict) -> torch.Tensor:
    return p["d"] * (p["q"] - 8)


def pack(p: dict):
    q = u8(p["q"])
    return to_numpy([fp16_bytes(p["d"]), q[:, :16] | (q[:, 16:] << 4)])


def unpack(b: torch.Tensor) -> dict:
    qs = b[:, 2:].to(torch.int64)
    return {"d": fp16_from_bytes(b[:, :2]), "q": torch.cat([qs & 15, qs >> 4], dim=-1).float()}
