"""Packing of small unsigned integers into int32 words as one little-endian bit stream.

Value ``k`` of a row occupies bits ``[k*bits, (k+1)*bits)`` of the stream; bit ``j`` of the stream is bit
``j % 32`` of word ``j // 32``. For 2, 4 and 8 bits no value straddles a word; for 3 bits, 32 values fill exactly
three words and values 10 and 21 straddle word boundaries (the GPTQ 3-bit layout).
"""
from __future__ import annotations

import torch

WORD_BITS = 32
_LOW32 = 0xFFFFFFFF


def words_for(n_values: int, bits: int) -> int:
    if (n_values * bits) % WORD_BITS:
        raise ValueError(f"{n_values} values of {bits} bits do not fill whole 32-bit words")
    return n_values * bits // WORD_BITS


def _to_int32(words64: torch.Tensor) -> torch.Tensor:
    """Reinterpret the low 32 bits of int64 values as int32 (two's complement wrap)."""
    w = words64 & _LOW32
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_last_dim(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[..., n]`` integers in ``[0, 2**bits)`` -> ``[..., n*bits/32]`` int32 words."""
    n = values.shape[-1]
    n_words = words_for(n, bits)
    v = values.to(torch.int64)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 2**bits):
        raise ValueError(f"values out of range for {bits}-bit packing: [{int(v.min())}, {int(v.max())}]")
    if WORD_BITS % bits == 0:
        per_word = WORD_BITS // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=v.device) * bits
        words = (v.reshape(*v.shape[:-1], n_words, per_word) << shifts).sum(dim=-1)
        return _to_int32(words)
    # 3 bits: 32 values fill exactly 3 words; loop over the 32 positions, vectorised over chunks.
    chunk = v.reshape(*v.shape[:-1], n // WORD_BITS, WORD_BITS)
    words = torch.zeros(*chunk.shape[:-1], bits + 1, dtype=torch.int64, device=v.device)
    for k in range(WORD_BITS):
        word, shift = divmod(k * bits, WORD_BITS)
        shifted = chunk[..., k] << shift
        words[..., word] |= shifted & _LOW32
        words[..., word + 1] |= shifted >> WORD_BITS
    return _to_int32(words[..., :bits].reshape(*v.shape[:-1], n_words))


def unpack_last_dim(words: torch.Tensor, bits: int, n_values: int) -> torch.Tensor:
    """Inverse of :func:`pack_last_dim`: ``[..., n_words]`` int32 -> ``[..., n_values]`` int32 in ``[0, 2**bits)``."""
    if words.shape[-1] != words_for(n_values, bits):
        raise ValueError(f"{words.shape[-1]} words cannot hold exactly {n_values} values of {bits} bits")
    w = words.to(torch.int64) & _LOW32
    mask = 2**bits - 1
    if WORD_BITS % bits == 0:
        per_word = WORD_BITS // bits
        shifts = torch.arange(per_word, dtype=torch.int64, device=w.device) * bits
        vals = (w.unsqueeze(-1) >> shifts) & mask
        return vals.reshape(*w.shape[:-1], n_values).to(torch.int32)
    chunk = w.reshape(*w.shape[:-1], -1, bits)
    chunk = torch.cat([chunk, torch.zeros_like(chunk[..., :1])], dim=-1)
    out = torch.empty(*chunk.shape[:-1], WORD_BITS, dtype=torch.int64, device=w.device)
    for k in range(WORD_BITS):
        word, shift = divmod(k * bits, WORD_BITS)
        val = (chunk[..., word] >> shift) | (chunk[..., word + 1] << (WORD_BITS - shift))
        out[..., k] = val & mask
    return out.reshape(*w.shape[:-1], n_values).to(torch.int32)
