"""Q5_0: blocks of 32, ``w = d * (q - 16)``, q in 0..31 (symmetric, largest-magnitude weight -> code 0).

Layout (22 bytes): d fp16 | qh: 4 bytes, bit j (little-endian uint32) = bit 4 of q[j] |
qs[16]: byte j = low nibble of q[j] | low nibble of q[j + 16] << 4.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from ._common import bits_to_bytes, fp16, fp16_bytes, rnd, safe_inv, to_numpy, u8

TYPE = GGMLQuantizationType.Q5_0
BLOCK = 32
CODES = (0, 31)  # range of the stored code field "q"


def quantize(x: torch.Tensor, v=None) -> dict:
    idx = x.abs().argmax(dim=-1, keepdim=True)
    d = fp16(torch.gather(x, -1, idx) / -16)
    q = (rnd(x * safe_inv(d), v) + 16).clamp(0, 31)
    return {"d": d, "q": q}


def dequantize(p: dict) -> torch.Tensor:
    return p["d"] * (p["q"] - 16)


def pack_5bit(q: torch.Tensor) -> list:
    """qh (4 bytes) and qs (16 bytes) of 32 five-bit codes, shared with Q5_1."""
    q = u8(q)
    low = q & 15
    return [bits_to_bytes(q >> 4), low[:, :16] | (low[:, 16:] << 4)]


def pack(p: dict):
    return to_numpy([fp16_bytes(p["d"])] + pack_5bit(p["q"]))
