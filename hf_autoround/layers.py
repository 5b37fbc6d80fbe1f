"""Which linear layers get quantised, and how: a pure plan computed from a model skeleton and a config.

A layer inside a transformer block gets the config's scheme (after ``extra_config`` overrides); a layer outside
the blocks is quantised only when ``extra_config`` names it with integer bits, or when it is the lm_head and
``quant_lm_head`` is set (refused for tied embeddings). Layers that the packing format cannot hold stay float.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.nn as nn

from .config import AutoRoundConfig, match_override
from .formats import get_layout
from .scheme import FLOAT_BITS, QuantScheme

logger = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """``quantized``: layer name -> scheme; ``kept_float``: layer name -> why it stays float."""

    packing_format: str
    block_names: list[str]
    quantized: dict[str, QuantScheme] = field(default_factory=dict)
    kept_float: dict[str, str] = field(default_factory=dict)

    def log(self, action: str) -> None:
        kinds = sorted({s.describe() for s in self.quantized.values()})
        logger.info("%s %d linear layers (%s, packing %s) in %s", action, len(self.quantized), ", ".join(kinds),
                    self.packing_format, ",".join(self.block_names))
        for name, why in self.kept_float.items():
            logger.info("kept in float: %s (%s)", name, why)


def detect_block_names(model: nn.Module) -> list[str]:
    """The ModuleList(s) of repeated transformer blocks: the list with the most linear layers in it."""
    best, best_count = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        count = sum(isinstance(m, nn.Linear) for m in module.modules())
        if count > best_count:
            best, best_count = name, count
    if best is None:
        raise ValueError("could not find the transformer blocks (a ModuleList of linear layers); "
                         "set block_name_to_quantize")
    return [best]


def _in_blocks(name: str, block_names: list[str]) -> bool:
    return any(name.startswith(b + ".") for b in block_names)


def _lm_head_is_tied(model: nn.Module) -> bool:
    """Tied when the config says so or when the lm_head and the input embeddings share one weight tensor."""
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return True
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight


def _scheme_outside_blocks(model, name, module, config) -> QuantScheme | None:
    override = match_override(config.extra_config, name)
    is_lm_head = hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is module
    if is_lm_head and (config.quant_lm_head or (override and override.get("bits", FLOAT_BITS) < FLOAT_BITS)):
        if _lm_head_is_tied(model):
            raise ValueError("quant_lm_head: the lm_head shares its weight with the input embeddings "
                             "(tie_word_embeddings); it cannot be quantised on its own")
        return config.scheme_for(name)
    if override and override.get("bits", FLOAT_BITS) < FLOAT_BITS:
        return config.scheme_for(name)
    return None


def plan_layers(model: nn.Module, config: AutoRoundConfig) -> LayerPlan:
    block_names = config.block_names or detect_block_names(model)
    for b in block_names:
        try:
            model.get_submodule(b)
        except AttributeError as err:
            raise ValueError(f"block_name_to_quantize: {b!r} is not a module of this model") from err
    layout = get_layout(config.resolved_packing_format)
    plan = LayerPlan(packing_format=config.resolved_packing_format, block_names=list(block_names))
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _in_blocks(name, block_names):
            scheme = config.scheme_for(name)
            if scheme is None:
                plan.kept_float[name] = "extra_config keeps it float"
                continue
        else:
            scheme = _scheme_outside_blocks(model, name, module, config)
            if scheme is None:
                continue  # embeddings, lm_head and heads stay float unless asked; not worth a log line each
        reason = layout.can_hold(module.in_features, module.out_features, scheme)
        if reason:
            plan.kept_float[name] = reason
            continue
        plan.quantized[name] = scheme
    return plan


def record_plan(config: AutoRoundConfig, plan: LayerPlan) -> None:
    """Write what was done into the config that is saved with the checkpoint."""
    config.packing_format = plan.packing_format
    config.block_name_to_quantize = ",".join(plan.block_names)  # the reference writes a comma-separated str
    default = config.scheme
    for name, scheme in plan.quantized.items():
        if scheme != default:
            config.extra_config[name] = {"bits": scheme.bits, "group_size": scheme.group_size, "sym": scheme.sym}
    for name in plan.kept_float:
        config.extra_config[name] = {"bits": FLOAT_BITS}
