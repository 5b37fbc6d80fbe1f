"""Makes transformers dispatch ``quant_method: "auto-round"`` (and the older ``"intel/auto-round"``) to us.

transformers ships an inference-only ``"auto-round"`` entry that needs the intel ``auto_round`` package; its public
``register_*`` helpers refuse existing names, so that entry is replaced in the registry dicts directly.
"""
from __future__ import annotations

_NAMES = ("auto-round", "intel/auto-round")


def register() -> None:
    """Idempotent: point every name in ``_NAMES`` at our config and quantizer classes."""
    from transformers.quantizers import auto

    from .config import AutoRoundConfig
    from .quantizer import AutoRoundHfQuantizer

    for name in _NAMES:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[name] = AutoRoundConfig
        auto.AUTO_QUANTIZER_MAPPING[name] = AutoRoundHfQuantizer

