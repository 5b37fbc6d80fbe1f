"""Helpers shared by the per-type GGUF block modules: rounding, fp16 storage, bit packing into bytes.

Every block module works on ``x``: float32 ``[n_blocks, block_size]`` rows of one tensor, and returns its parameters
as a dict of tensors whose integer fields hold integer-valued floats (so a tuning loop can differentiate through
the codes with a straight-through estimator). ``pack`` turns the dict into ``uint8 [n_blocks, type_size]``.
"""
from __future__ import annotations

import numpy as np
import torch

from ...qdq import round_ste


def rnd(x: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Round to nearest (straight-through), after adding SignRound's perturbation ``v`` when given."""
    return round_ste(x if v is None else x + v)


def fp16(x: torch.Tensor) -> torch.Tensor:
    """The value a stored fp16 field reads back as, in float32."""
    return x.to(torch.float16).to(torch.float32)


def safe_inv(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def u8(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.int64).to(torch.uint8)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``[n]`` floats -> ``[n, 2]`` little-endian fp16 bytes."""
    return x.detach().reshape(-1, 1).to(torch.float16).view(torch.uint8).reshape(-1, 2)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def bits_to_bytes(bits: torch.Tensor) -> torch.Tensor:
    """``[..., 8k]`` values in {0, 1} -> ``[..., k]`` bytes, element i in bit i % 8 of byte i // 8."""
    b = bits.to(torch.int64).reshape(*bits.shape[:-1], -1, 8)
    return (b << torch.arange(8)).sum(-1).to(torch.uint8)


def to_numpy(parts: list[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.to(torch.uint8) for p in parts], dim=-1).contiguous().numpy()
