"""Q2_K: super-blocks of 256 = 16 sub-blocks of 16; ``w = (d*sc) * q - (dmin*m)``, q in 0..3, sc and m 4-bit.

Layout (84 bytes): scales[16]: sub-block s -> sc (low nibble) | m (high nibble) | qs[64]: weight
``128n + 32j + l`` (n < 2, j < 4, l < 32) sits in bits 2j..2j+1 of byte ``32n + l`` | d fp16 | dmin fp16.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from . import _kquant
from ._common import fp16_bytes, to_numpy, u8

TYPE = GGMLQuantizationType.Q2_K
BLOCK = _kquant.QK_K
CODES = (0, 3)  # range of the stored code field "q"
SUB = 16


def quantize(x: torch.Tensor, v=None) -> dict:
    return _kquant.asym(x, SUB, qmax=3, smax=15, v=v, search=(-0.5, 0.1, 15))


def dequantize(p: dict) -> torch.Tensor:
    return _kquant.asym_dequantize(p, SUB)


def pack(p: dict):
    nb = p["q"].shape[0]
    q = u8(p["q"]).reshape(nb, 2, 4, 32).to(torch.int64)
    qs = (q << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(nb, 64)
    scales = u8(p["sc"]) | (u8(p["m"]) << 4)
    return to_numpy([scales, qs.to(torch.uint8), fp16_bytes(p["d"]), fp16_bytes(p["dmin"])])
