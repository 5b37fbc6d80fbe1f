"""Q8_0: blocks of 32, ``w = d * q``, q int8 in -127..127, ``d = max|w| / 127``.

Layout (34 bytes): d fp16 | qs: 32 int8.
"""
from __future__ import annotations

import torch

from gguf import GGMLQuantizationType

from ._common import fp16, fp16_bytes, rnd, safe_inv, to_numpy

TYPE = GGMLQuantizationType.Q8_0
BLOCK = 32
CODES = (-127, 127)  # range of the stored code field "q"


def quantize(x: torch.Tensor, v=None) -> dict:
    d = fp16(x.abs().amax(-1, keepdim=True) / 127)
    q = rnd(x * safe_inv(d), v).clamp(-127, 127)
    return {"d": d, "q": q}


def dequantize(p: dict) -> torch.Tensor:
    return p["q"] * p["d"]


def pack(p: dict):
    q = p["q"].detach().to(torch.int8).view(torch.uint8)
    return to_numpy([fp16_bytes(p["d"]), q])
