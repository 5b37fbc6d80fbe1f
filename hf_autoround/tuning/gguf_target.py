"""GGUF-aware tuning: when the only output is one GGUF file, every planned block linear is tuned on the grid of the
GGML type that the format's mix gives its tensor (Q4_K, Q6_K for some ``attn_v`` / ``ffn_down``, a fallback type
where a row does not fit 256-weight super-blocks, ...), and the block parameters the tuning chose are handed to the
writer unchanged. The model itself stays a float model whose tuned weights hold exactly the values a GGUF reader
gets back; it can be written in that one format only.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..export.gguf.grid import GridWeight
from ..export.gguf.mixes import BLOCK_MODULES, MIXES

logger = logging.getLogger(__name__)


@dataclass
class GgufTuning:
    """``fmt``: the mix name (``q4_k_m``); ``types``: linear name -> GGML type name it is tuned and stored as;
    ``params``: weight name -> (type name, block parameters), filled in as layers are finished."""

    fmt: str
    types: dict[str, str]
    params: dict[str, tuple[str, dict]] = field(default_factory=dict)

    @classmethod
    def plan(cls, model: nn.Module, fmt: str, layer_names) -> "GgufTuning":
        from ..export.gguf import mix_name
        from ..export.gguf.writer import tensor_slots

        mix = mix_name(fmt)
        if MIXES[mix].base not in BLOCK_MODULES:
            raise ValueError(f"format={fmt!r} stores float weights: there is no grid to tune on")
        slots = tensor_slots(model, mix)
        types, untuned = {}, []
        for name in layer_names:
            slot = slots.get(f"{name}.weight")
            if slot is not None and slot.qtype in BLOCK_MODULES:
                types[name] = slot.qtype.name.lower()
            else:
                untuned.append(name)
        counts = {t: sum(1 for v in types.values() if v == t) for t in sorted(set(types.values()))}
        logger.info("GGUF %s: tuning on the GGML grids %s", mix, counts)
        if untuned:
            logger.info("GGUF %s: %d planned layers are stored unquantised by the mix (%s...): kept float",
                        mix, len(untuned), untuned[0])
        return cls(mix, types)

    def grid(self, name: str, weight: torch.Tensor) -> GridWeight | None:
        """The grid linear ``name`` is tuned on (None: the mix stores it as a float type)."""
        qtype = self.types.get(name)
        return None if qtype is None else GridWeight.of(weight, qtype)

    @torch.no_grad()
    def store(self, linear: nn.Linear, name: str, grid: GridWeight, v: torch.Tensor | None) -> None:
        """Keep the block parameters for ``v`` and give ``linear`` exactly the values the file will hold."""
        params = grid.params(linear.weight, v)
        self.params[f"{name}.weight"] = (grid.name, params)
        linear.weight.data = grid.dequantize(params).to(linear.weight.dtype)

    def check_format(self, fmt: str) -> None:
        """Raise unless ``fmt`` is the format this model was tuned for."""
        from ..export.gguf import PREFIX

        name = fmt[len(PREFIX):] if fmt.startswith(PREFIX) else None
        if name != self.fmt:
            raise ValueError(f"this model was tuned on the GGUF grid of {PREFIX}{self.fmt} and can only be written "
                             f"as format={PREFIX + self.fmt!r}, not {fmt!r}; quantise again for other formats")
