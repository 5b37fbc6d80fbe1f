"""Which GGML type each tensor of a GGUF file gets, per format name — the same choices llama.cpp's quantize tool
makes for its mixes (``_s`` / ``_m`` / ``_l``): a base type for the block linears, more bits for ``attn_v`` and
``ffn_down`` in some layers, Q6_K for the output projection (or the tied token embedding), F32 for norms.

A plain type name (``q4_k``, ``q4_0``, ...) uses that type for every linear, with llama.cpp's output rule.
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as F

from . import q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0

BLOCK_MODULES = {m.TYPE: m for m in (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k)}
FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class Mix:
    base: T
    file_type: F


MIXES = {
    "bf16": Mix(T.BF16, F.MOSTLY_BF16), "f16": Mix(T.F16, F.MOSTLY_F16),
    "q4_0": Mix(T.Q4_0, F.MOSTLY_Q4_0), "q4_1": Mix(T.Q4_1, F.MOSTLY_Q4_1), "q5_0": Mix(T.Q5_0, F.MOSTLY_Q5_0),
    "q5_1": Mix(T.Q5_1, F.MOSTLY_Q5_1), "q8_0": Mix(T.Q8_0, F.MOSTLY_Q8_0),
    "q2_k": Mix(T.Q2_K, F.MOSTLY_Q2_K), "q3_k": Mix(T.Q3_K, F.MOSTLY_Q3_K_S), "q4_k": Mix(T.Q4_K, F.MOSTLY_Q4_K_S),
    "q5_k": Mix(T.Q5_K, F.MOSTLY_Q5_K_S), "q6_k": Mix(T.Q6_K, F.MOSTLY_Q6_K),
    "q2_k_s": Mix(T.Q2_K, F.MOSTLY_Q2_K_S), "q3_k_s": Mix(T.Q3_K, F.MOSTLY_Q3_K_S),
    "q3_k_m": Mix(T.Q3_K, F.MOSTLY_Q3_K_M), "q3_k_l": Mix(T.Q3_K, F.MOSTLY_Q3_K_L),
    "q4_k_s": Mix(T.Q4_K, F.MOSTLY_Q4_K_S), "q4_k_m": Mix(T.Q4_K, F.MOSTLY_Q4_K_M),
    "q5_k_s": Mix(T.Q5_K, F.MOSTLY_Q5_K_S), "q5_k_m": Mix(T.Q5_K, F.MOSTLY_Q5_K_M),
}
# when a row length does not fit the chosen type's block: llama.cpp's fallbacks
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def block_size(qtype: T) -> int:
    return BLOCK_MODULES[qtype].BLOCK if qtype in BLOCK_MODULES else 1


def _more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _mixed(mix: str, role: str, i: int, n: int, n_gqa: int, base: T) -> T:
    if role == "attn_v":
        if mix == "q2_k_s" and n_gqa >= 4:
            return T.Q4_K
        if mix == "q3_k_m":
            return T.Q5_K if i < 2 else T.Q4_K
        if mix == "q3_k_l":
            return T.Q5_K
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return T.Q6_K
        if mix == "q4_k_s" and i < 4:
            return T.Q5_K
    elif role == "ffn_down":
        if mix == "q2_k_s" and i < n // 8:
            return T.Q4_K
        if mix == "q3_k_m":
            return T.Q5_K if i < n // 16 else T.Q4_K
        if mix == "q3_k_l":
            return T.Q5_K
        if mix in ("q4_k_m", "q5_k_m") and _more_bits(i, n):
            return T.Q6_K
        if mix == "q4_k_s" and i < n // 8:
            return T.Q5_K
    elif role == "attn_output":
        if mix == "q3_k_m":
            return T.Q4_K
        if mix == "q3_k_l":
            return T.Q5_K
    return base


def tensor_type(mix: str, gguf_name: str, shape: tuple, n_layers: int, n_gqa: int, tied: bool) -> T:
    """The GGML type of one tensor (``gguf_name`` like ``blk.3.ffn_down.weight``; ``shape`` as in torch)."""
    base = MIXES[mix].base
    if len(shape) < 2 or not gguf_name.endswith(".weight"):
        return T.F32
    if base in FLOAT_TYPES:
        return base
    if gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight"):
        qtype = T.Q8_0 if shape[-1] % 256 or base == T.Q8_0 else T.Q6_K
    elif gguf_name.startswith("blk."):
        parts = gguf_name.split(".")
        qtype = _mixed(mix, parts[2], int(parts[1]), n_layers, n_gqa, base)
    else:
        qtype = base
    while shape[-1] % block_size(qtype):
        qtype = _FALLBACK.get(qtype, T.F16)
    return qtype
