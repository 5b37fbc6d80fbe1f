"""Q3_K: super-blocks of 256 = 16 sub-blocks of 16; ``w = (d*sc) * q``, q in -4..3, signed 6-bit sc in -32..31.

Layout (110 bytes): hmask[32]: bit k of byte l = (q + 4 >= 4) for weight ``32k + l`` | qs[64]: the low two bits of
``q + 4``, weight ``128n + 32j + l`` in bits 2j.. of byte ``32n + l`` | scales[12]: ``sc + 32`` (6 bits) for
sub-block i: low nibble in byte i (i < 8) or high nibble of byte i - 8 (i >= 8), top two bits in bits
2*(i // 4).. of byte 8 + i % 4 | d fp16.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from . import _kquant
from ._common import bits_to_bytes, fp16_bytes, to_numpy, u8

TYPE = GGMLQuantizationType.Q3_K
BLOCK = _kquant.QK_K
CODES = (-4, 3)  # range of the stored code field "q"
SUB = 16


def quantize(x: torch.Tensor, v=None) -> dict:
    return _kquant.sym(x, SUB, qneg=4, sneg=32, v=v)


def dequantize(p: dict) -> torch.Tensor:
    return _kquant.sym_dequantize(p, SUB)


def pack(p: dict):
    nb = p["q"].shape[0]
    level = (p["q"].detach() + 4).to(torch.int64)  # 0..7
    low = (level & 3).reshape(nb, 2, 4, 32)
    qs = (low << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(nb, 64)
    high = (level >> 2).reshape(nb, 8, 32).transpose(1, 2)  # [nb, l, k]
    hmask = bits_to_bytes(high).reshape(nb, 32)
    s = (p["sc"].detach() + 32).to(torch.int64)  # [nb, 16] in 0..63
    low4 = s & 15
    lscales = low4[:, :8] | (low4[:, 8:] << 4)
    top = (s >> 4).reshape(nb, 4, 4)  # [nb, i // 4, i % 4]
    hscales = (top << (2 * torch.arange(4)).reshape(1, 4, 1)).sum(1)
    return to_numpy([hmask, qs.to(torch.uint8), lscales.to(torch.uint8), hscales.to(torch.uint8),
                     fp16_bytes(p["d"])])
