"""GPTQ-family layout, shared by ``auto_round:auto_gptq``, ``auto_round`` and plain GPTQ checkpoints.

qweight  int32 ``[in*bits/32, out]``  codes packed along *in* (bit stream per column, see bitpack)
qzeros   int32 ``[n_groups, out*bits/32]``  zero points packed along *out*
scales   fp16  ``[n_groups, out]``
g_idx    int32 ``[in]`` (optional on read; ``i // group_size`` when written)

``zero_offset`` is 1 for the GPTQ v1 convention (``auto_round:auto_gptq``, ``gptq``): the stored zero point is the
real one minus one, and a reader adds the one back without masking (so a stored all-ones field reads as
``2**bits``). It is 0 for raw zero points (``auto_round``, ``auto_round:gptqmodel``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheme import QuantizedWeight, QuantScheme
from .bitpack import pack_last_dim, unpack_last_dim, words_for


@dataclass(frozen=True)
class GPTQLayout:
    name: str
    zero_offset: int
    write_g_idx: bool = False

    def tensor_specs(self, in_features: int, out_features: int, scheme: QuantScheme) -> dict:
        ng = scheme.n_groups(in_features)
        specs = {
            "qweight": ((words_for(in_features, scheme.bits), out_features), torch.int32),
            "qzeros": ((ng, words_for(out_features, scheme.bits)), torch.int32),
            "scales": ((ng, out_features), torch.float16),
        }
        if self.write_g_idx:
            specs["g_idx"] = ((in_features,), torch.int32)
        return specs

    def can_hold(self, in_features: int, out_features: int, scheme: QuantScheme) -> str | None:
        """None if the shape packs exactly, else the reason it does not."""
        per = 32 // _gcd(32, scheme.bits)
        if in_features % per or out_features % per:
            return f"in/out features must be multiples of {per} for {scheme.bits}-bit packing"
        return None

    def pack(self, qw: QuantizedWeight) -> dict:
        bits = qw.scheme.bits
        stored_zeros = qw.zeros - self.zero_offset
        if int(stored_zeros.min()) < 0:
            raise ValueError(f"{self.name} stores zero points minus {self.zero_offset}; a zero point of 0 cannot be stored")
        tensors = {
            "qweight": pack_last_dim(qw.codes.t(), bits).t().contiguous(),
            "qzeros": pack_last_dim(stored_zeros, bits),
            "scales": qw.scales.to(torch.float16).contiguous(),
        }
        if self.write_g_idx:
            tensors["g_idx"] = qw.group_index().to(torch.int32)
        return tensors

    def unpack(self, tensors: dict, in_features: int, out_features: int, scheme: QuantScheme) -> QuantizedWeight:
        bits = scheme.bits
        codes = unpack_last_dim(tensors["qweight"].t(), bits, in_features).t().contiguous()
        zeros = unpack_last_dim(tensors["qzeros"], bits, out_features) + self.zero_offset
        return QuantizedWeight(codes=codes, scales=tensors["scales"], zeros=zeros, scheme=scheme)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a
