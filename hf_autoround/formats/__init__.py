"""Checkpoint packing formats: one layout object per ``packing_format`` name (bit layouts in each module).

``get_layout(name)`` resolves aliases; ``default_packing_format(scheme)`` is what we write when none is asked for.
"""
from __future__ import annotations

from ..scheme import QuantScheme
from .awq import AWQLayout
from .gptq import GPTQLayout

AUTO_GPTQ = "auto_round:auto_gptq"
AUTO_ROUND = "auto_round"
AUTO_AWQ = "auto_round:auto_awq"

_LAYOUTS = {
    AUTO_GPTQ: GPTQLayout(AUTO_GPTQ, zero_offset=1),
    AUTO_ROUND: GPTQLayout(AUTO_ROUND, zero_offset=0),
    AUTO_AWQ: AWQLayout(AUTO_AWQ),
}
_ALIASES = {
    "auto": AUTO_GPTQ,
    "auto_gptq": AUTO_GPTQ,
    "auto_round:gptq": AUTO_GPTQ,  # transformers' name for a converted plain GPTQ (v1) checkpoint
    "gptq": AUTO_GPTQ,
    "auto_round:gptqmodel": AUTO_ROUND,
    "auto_round:awq": AUTO_AWQ,  # transformers' name for a converted plain AWQ (gemm) checkpoint
    "awq": AUTO_AWQ,
    "auto_awq": AUTO_AWQ,
}
KNOWN_FORMATS = tuple(sorted(set(_LAYOUTS) | set(_ALIASES)))


def canonical_format(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in _LAYOUTS:
        raise ValueError(f"packing_format={name!r} is unknown; expected one of {KNOWN_FORMATS}")
    return name


def get_layout(name: str):
    return _LAYOUTS[canonical_format(name)]


def default_packing_format(scheme: QuantScheme) -> str:
    """Symmetric schemes use the GPTQ v1 convention (readable by every GPTQ consumer); asymmetric ones store raw
    zero points, because GPTQ v1 cannot store a zero point of 0."""
    return AUTO_GPTQ if scheme.sym else AUTO_ROUND
