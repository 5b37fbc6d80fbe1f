"""Small helpers shared by tests (not fixtures)."""
from __future__ import annotations

import torch


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def quantize_dir(float_dir: str, out_dir: str, **config_kwargs):
    """float checkpoint -> from_pretrained with our config -> model.quantize() -> save; returns the in-memory model."""
    from transformers import AutoModelForCausalLM

    from hf_autoround import AutoRoundConfig

    config_kwargs.setdefault("iters", 0)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=AutoRoundConfig(**config_kwargs))
    model.quantize()
    model.save_pretrained(out_dir)
    return model
