"""The quantisation scheme of one layer and the unpacked form of a quantised weight.

Everything downstream (qdq, formats, backends, tuning) speaks in these two dataclasses; none of them hangs
state on ``nn.Linear``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
STANDARD_GROUP_SIZES = (-1, 32, 64, 128)
FLOAT_BITS = 16  # ``bits: 16`` in a layer override means "leave this layer in float"


@dataclass(frozen=True)
class QuantScheme:
    """Weight-only integer quantisation: ``bits`` per weight, one scale (and zero point) per ``group_size`` inputs."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits!r} is not supported; expected one of {SUPPORTED_BITS}")
        if not (self.group_size == -1 or (isinstance(self.group_size, int) and self.group_size > 0)):
            raise ValueError(f"group_size={self.group_size!r} is not valid; expected -1 (per channel) or a positive int")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_len(self, in_features: int) -> int:
        """Inputs per group for a layer with ``in_features`` inputs (``-1`` means one group per output row)."""
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return (in_features + g - 1) // g

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.sym else 'asym'}"


@dataclass
class QuantizedWeight:
    """A weight in unpacked integer form, laid out like the GPTQ family of checkpoints.

    codes:  int32 ``[in, out]``, values in ``0 .. 2**bits - 1``
    scales: float ``[n_groups, out]``
    zeros:  int32 ``[n_groups, out]`` (the integer zero point; ``w = (code - zero) * scale``)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: QuantScheme

    @property
    def in_features(self) -> int:
        return self.codes.shape[0]

    @property
    def out_features(self) -> int:
        return self.codes.shape[1]

    def group_index(self) -> torch.Tensor:
        """Group of each input row, ``i // group_len``."""
        g = self.scheme.group_len(self.in_features)
        return torch.arange(self.in_features, device=self.codes.device) // g
