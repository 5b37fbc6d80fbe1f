"""Q4_K: super-blocks of 256 = 8 sub-blocks of 32; ``w = (d*sc) * q - (dmin*m)``, q in 0..15, sc and m 6-bit.

Layout (144 bytes): d fp16 | dmin fp16 | scales[12] (see ``_kquant.pack_scales_6bit``) | qs[128]: weight
``64c + 32h + l`` in nibble h of byte ``32c + l``.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from . import _kquant
from ._common import fp16_bytes, to_numpy, u8

TYPE = GGMLQuantizationType.Q4_K
BLOCK = _kquant.QK_K
CODES = (0, 15)  # range of the stored code field "q"
SUB = 32


def quantize(x: torch.Tensor, v=None) -> dict:
    return _kquant.asym(x, SUB, qmax=15, smax=63, v=v)


def dequantize(p: dict) -> torch.Tensor:
    return _kquant.asym_dequantize(p, SUB)


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """256 codes (low four bits used) -> 128 bytes, pairs of 32-weight sub-blocks sharing bytes (low, high)."""
    q = u8(q).reshape(q.shape[0], 4, 2, 32) & 15
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def pack(p: dict):
    return to_numpy([fp16_bytes(p["d"]), fp16_bytes(p["dmin"]), _kquant.pack_scales_6bit(p["sc"], p["m"]),
                     nibbles(p["q"])])
