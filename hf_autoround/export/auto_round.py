"""The native format: ``quant_method: "auto-round"`` via ``save_pretrained`` (safetensors only)."""
from __future__ import annotations

from ..formats import canonical_format


def write(model, tokenizer, directory: str, fmt: str) -> None:
    config = model.config.quantization_config
    if fmt != "auto_round":
        wanted = canonical_format(fmt)
        if canonical_format(config.packing_format) != wanted:
            raise ValueError(f"format={fmt!r}: the model was packed as {config.packing_format}; quantize with "
                             f"packing_format={wanted!r} to write this format")
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
