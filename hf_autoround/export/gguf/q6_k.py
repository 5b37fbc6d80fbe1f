"""Q6_K: super-blocks of 256 = 16 sub-blocks of 16; ``w = (d*sc) * q``, q in -32..31, sc int8.

Layout (210 bytes): ql[128]: low nibble of ``q + 32`` for weight ``128n + 64h + l`` (l < 64) in nibble h of byte
``64n + l`` | qh[64]: its top two bits, weight ``128n + 32k + l`` (l < 32) in bits 2k.. of byte ``32n + l`` |
scales: 16 int8 | d fp16.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from . import _kquant
from ._common import fp16_bytes, to_numpy

TYPE = GGMLQuantizationType.Q6_K
BLOCK = _kquant.QK_K
CODES = (-32, 31)  # range of the stored code field "q"
SUB = 16


def quantize(x: torch.Tensor, v=None) -> dict:
    return _kquant.sym(x, SUB, qneg=32, sneg=128, v=v)


def dequantize(p: dict) -> torch.Tensor:
    return _kquant.sym_dequantize(p, SUB)


def pack(p: dict):
    nb = p["q"].shape[0]
    level = (p["q"].detach() + 32).to(torch.int64)  # 0..63
    low = (level & 15).reshape(nb, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(nb, 128)
    top = (level >> 4).reshape(nb, 2, 4, 32)
    qh = (top << (2 * torch.arange(4)).reshape(1, 1, 4, 1)).sum(2).reshape(nb, 64)
    scales = p["sc"].detach().to(torch.int8).view(torch.uint8)
    return to_numpy([ql.to(torch.uint8), qh.to(torch.uint8), scales, fp16_bytes(p["d"])])
