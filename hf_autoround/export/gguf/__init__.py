"""GGUF export: ``gguf:<type or mix>`` formats, written with the ``gguf`` package's ``GGUFWriter``.

Types: ``q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k`` (every linear in that type), llama.cpp's mixes
``q2_k_s q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m`` (:mod:`.mixes`), and ``bf16`` / ``f16``.
One reference block module per type (``q4_0.py`` ...): ``quantize(x, v=None)`` (the type's grid, with super-group
double quantisation of scales and mins for the k-quants; ``v`` is SignRound's rounding perturbation),
``dequantize(params)`` (bit-exact with what a GGUF reader computes) and ``pack(params)`` (the ggml block bytes).

The file is ``<dir>/<model name>-<FORMAT>.gguf``. Weights come from float linears or from QuantLinear layers; a
QuantLinear whose scheme is the type's own grid (``native_scheme``) is taken over without re-rounding (Q4_0, Q8_0,
Q4_1), any other is dequantised and quantised to the type's grid. A model tuned on the format's own grids
(``quantize_model(..., gguf_format=...)``, see :mod:`hf_autoround.tuning.gguf_target`) is written with the block
parameters its tuning chose.
"""
from __future__ import annotations

import os

from ...scheme import QuantScheme
from .mixes import MIXES

PREFIX = "gguf:"
FORMATS = tuple(PREFIX + name for name in MIXES)

# the integer scheme (bits, group, sym) of each base type, when this package can tune one
_NATIVE = {"q4_0": (4, 32, True), "q4_1": (4, 32, False), "q8_0": (8, 32, True), "q2_k": (2, 16, False),
           "q3_k": (3, 16, True), "q4_k": (4, 32, False)}


def mix_name(fmt: str) -> str:
    name = fmt[len(PREFIX):] if fmt.startswith(PREFIX) else fmt
    if name not in MIXES:
        raise ValueError(f"format={fmt!r} is unknown; GGUF formats are {', '.join(FORMATS)}")
    return name


def stores_quantized(fmt: str) -> bool:
    """Whether the format's base type is a quantised GGML type (not bf16 / f16)."""
    return MIXES[mix_name(fmt)].base.name not in ("F16", "BF16")


def native_scheme(fmt: str) -> QuantScheme | None:
    """The integer scheme whose grid the format's base type stores (None for 5/6-bit types and floats)."""
    mix = mix_name(fmt)
    base = MIXES[mix].base.name.lower()
    spec = _NATIVE.get(base)
    return QuantScheme(bits=spec[0], group_size=spec[1], sym=spec[2]) if spec else None


def check_scheme(fmt: str, scheme: QuantScheme | None, on_grid: bool = False) -> None:
    """Raise ValueError when the model will be quantised with a scheme that the format cannot hold
    (None = a float model, quantised by the writer itself: always fine). ``on_grid``: the format is the only one
    asked for, so tuning uses its own grids; a base type with no integer scheme (Q5_*, Q6_K) is then fine."""
    mix = mix_name(fmt)
    if scheme is None or MIXES[mix].base.name in ("F16", "BF16"):
        return
    native = native_scheme(fmt)
    if native is None and on_grid:
        return
    if native is None:
        raise ValueError(f"format={fmt!r} stores {MIXES[mix].base.name} weights, which no integer scheme of this "
                         f"package produces; ask for this format alone (tuning then uses its grid), export a "
                         f"float model (the writer quantises it), or choose one of "
                         f"{', '.join(PREFIX + k for k in _NATIVE)}")
    if (scheme.bits, scheme.group_size, scheme.sym) != (native.bits, native.group_size, native.sym):
        raise ValueError(f"format={fmt!r} stores {native.describe()} weights (its base type "
                         f"{MIXES[mix].base.name}); the model is quantised {scheme.describe()}: quantise with "
                         f"bits={native.bits}, group_size={native.group_size}, sym={native.sym}")


def preflight(model, tokenizer, fmt: str) -> None:
    """The checks ``write`` makes before writing anything."""
    from .writer import arch_spec

    mix_name(fmt)
    if tokenizer is None:
        raise ValueError(f"format={fmt!r} needs the tokenizer: llama.cpp reads the vocabulary from the GGUF file")
    arch_spec(model)


def write(model, tokenizer, directory: str, fmt: str, tokenizer_pre: str | None = None) -> str:
    from .writer import gguf_file_name, write_gguf

    mix = mix_name(fmt)
    path = os.path.join(directory, gguf_file_name(model, mix))
    tuned_on = getattr(model, "gguf_tuning", None)  # a GGUF-grid tuning run: its block parameters, unchanged
    if tuned_on is not None:
        tuned_on.check_format(fmt)
    write_gguf(model, tokenizer, path, mix, tokenizer_pre=tokenizer_pre,
               params=None if tuned_on is None else tuned_on.params)
    return path
