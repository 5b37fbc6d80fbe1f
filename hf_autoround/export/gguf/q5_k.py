"""Q5_K: super-blocks of 256 = 8 sub-blocks of 32; ``w = (d*sc) * q - (dmin*m)``, q in 0..31, sc and m 6-bit.

Layout (176 bytes): d fp16 | dmin fp16 | scales[12] (as Q4_K) | qh[32]: bit k of byte l = bit 4 of the code of
weight ``32k + l`` | qs[128]: the low nibbles, as Q4_K.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from . import _kquant
from ._common import bits_to_bytes, fp16_bytes, to_numpy, u8
from .q4_k import nibbles

TYPE = GGMLQuantizationType.Q5_K
BLOCK = _kquant.QK_K
CODES = (0, 31)  # range of the stored code field "q"
SUB = 32


def quantize(x: torch.Tensor, v=None) -> dict:
    return _kquant.asym(x, SUB, qmax=31, smax=63, v=v, search=(-0.5, 0.1, 15))


def dequantize(p: dict) -> torch.Tensor:
    return _kquant.asym_dequantize(p, SUB)


def pack(p: dict):
    nb = p["q"].shape[0]
    high = (u8(p["q"]) >> 4).reshape(nb, 8, 32).transpose(1, 2)  # [nb, l, k]
    return to_numpy([fp16_bytes(p["d"]), fp16_bytes(p["dmin"]), _kquant.pack_scales_6bit(p["sc"], p["m"]),
                     bits_to_bytes(high).reshape(nb, 32), nibbles(p["q"])])
