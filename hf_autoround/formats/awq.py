"""AWQ GEMM layout (``auto_round:auto_awq``, plain ``awq`` version ``gemm``): 4-bit only.

qweight  int32 ``[in, out/8]``  codes packed along *out*, 8 per word, interleaved: output column ``8j + e`` sits in
         nibble ``ORDER[e]`` of word ``j`` with ``ORDER = (0, 4, 1, 5, 2, 6, 3, 7)``
qzeros   int32 ``[n_groups, out/8]``  raw zero points, same interleave
scales   fp16  ``[n_groups, out]``
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scheme import QuantizedWeight, QuantScheme
from .bitpack import pack_last_dim, unpack_last_dim

NIBBLE_OF_ELEMENT = (0, 4, 1, 5, 2, 6, 3, 7)
ELEMENT_OF_NIBBLE = tuple(NIBBLE_OF_ELEMENT.index(n) for n in range(8))  # (0, 2, 4, 6, 1, 3, 5, 7)


def _interleave(x: torch.Tensor) -> torch.Tensor:
    """Reorder the last dim so that plain sequential packing puts element e of each 8 in nibble ORDER[e]."""
    lead, n = x.shape[:-1], x.shape[-1]
    return x.reshape(*lead, n // 8, 8)[..., list(ELEMENT_OF_NIBBLE)].reshape(*lead, n)


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    lead, n = x.shape[:-1], x.shape[-1]
    return x.reshape(*lead, n // 8, 8)[..., list(NIBBLE_OF_ELEMENT)].reshape(*lead, n)


@dataclass(frozen=True)
class AWQLayout:
    name: str

    def tensor_specs(self, in_features: int, out_features: int, scheme: QuantScheme) -> dict:
        ng = scheme.n_groups(in_features)
        return {
            "qweight": ((in_features, out_features // 8), torch.int32),
            "qzeros": ((ng, out_features // 8), torch.int32),
            "scales": ((ng, out_features), torch.float16),
        }

    def can_hold(self, in_features: int, out_features: int, scheme: QuantScheme) -> str | None:
        if scheme.bits != 4:
            return f"{self.name} holds 4-bit weights only, not {scheme.bits}-bit"
        if out_features % 8:
            return "out_features must be a multiple of 8 for the AWQ layout"
        return None

    def pack(self, qw: QuantizedWeight) -> dict:
        reason = self.can_hold(qw.in_features, qw.out_features, qw.scheme)
        if reason:
            raise ValueError(reason)
        return {
            "qweight": pack_last_dim(_interleave(qw.codes), 4),
            "qzeros": pack_last_dim(_interleave(qw.zeros), 4),
            "scales": qw.scales.to(torch.float16).contiguous(),
        }

    def unpack(self, tensors: dict, in_features: int, out_features: int, scheme: QuantScheme) -> QuantizedWeight:
        codes = _deinterleave(unpack_last_dim(tensors["qweight"], 4, out_features))
        zeros = _deinterleave(unpack_last_dim(tensors["qzeros"], 4, out_features))
        return QuantizedWeight(codes=codes.contiguous(), scales=tensors["scales"], zeros=zeros, scheme=scheme)
