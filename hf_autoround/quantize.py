"""Model-level quantisation: plan the layers, compute integer weights (RTN here; SignRound in ``tuning``), swap
the linears for packed ``QuantLinear`` s, and record what was done in ``model.config.quantization_config``."""
from __future__ import annotations

import logging
import time

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .config import AutoRoundConfig
from .convert import set_submodule
from .file_pages import page_out
from .guards import apply_nonfinite_policy, check_packed
from .layers import LayerPlan, plan_layers, record_plan
from .qdq import quantize_weight
from .quant_linear import QuantLinear

logger = logging.getLogger(__name__)


def pack_layer(model: nn.Module, name: str, qw, packing_format: str) -> QuantLinear:
    """Replace the float linear ``name`` by a packed QuantLinear holding ``qw`` (and the linear's bias)."""
    check_packed(name, qw)
    linear = model.get_submodule(name)
    layer = QuantLinear.from_quantized(qw, packing_format, bias=linear.bias)
    layer.to(linear.weight.device)
    set_submodule(model, name, layer)
    page_out(linear.weight)  # a float weight mapped from its checkpoint file is no longer read
    return layer


@torch.no_grad()
def rtn_quantize(model: nn.Module, plan: LayerPlan, progress: bool = True) -> None:
    """Round-to-nearest, one layer at a time (the float weight of each is released as it is replaced)."""
    for name, scheme in tqdm(plan.quantized.items(), desc="RTN", unit="layer", disable=not progress):
        weight = model.get_submodule(name).weight
        pack_layer(model, name, quantize_weight(weight, scheme), plan.packing_format)


def mark_quantized(model: nn.Module, config: AutoRoundConfig) -> None:
    """Make ``save_pretrained`` write our config and tensors, also for a model that was loaded some other way."""
    from .quantizer import AutoRoundHfQuantizer

    model.config.quantization_config = config
    model.is_quantized = True
    model.quantization_method = config.quant_method
    if not isinstance(getattr(model, "hf_quantizer", None), AutoRoundHfQuantizer):
        model.hf_quantizer = AutoRoundHfQuantizer(config, pre_quantized=True)
    model.hf_quantizer.quantization_config = config


def _quantize_on_gguf_grid(model, plan: LayerPlan, config, fmt, tokenizer, dataset, progress, tuning_kwargs):
    from .tuning import tune_model
    from .tuning.gguf_target import GgufTuning

    in_blocks = [n for n in plan.quantized if any(n.startswith(b + ".") for b in plan.block_names)]
    tuning = GgufTuning.plan(model, fmt, in_blocks)
    if config.iters == 0 and dataset is None:
        for name in tqdm(tuning.types, desc=f"RTN on {fmt}", unit="layer", disable=not progress):
            linear = model.get_submodule(name)
            tuning.store(linear, name, tuning.grid(name, linear.weight), None)
    else:
        tune_model(model, plan, config, tokenizer=tokenizer, dataset=dataset, progress=progress, gguf=tuning,
                   **tuning_kwargs)
    model.gguf_tuning = tuning


def attach_default_kernels(model: nn.Module, config: AutoRoundConfig) -> None:
    """The in-memory quantised model runs on the same kernels it would get when reloaded from disk."""
    from .backends import attach_kernels

    attach_kernels(model, forced=config.backend, dtype=next(model.parameters()).dtype)


def quantize_model(model: nn.Module, config: AutoRoundConfig, tokenizer=None, dataset=None, progress: bool = True,
                   on_nonfinite: str = "raise", gguf_format: str | None = None, **tuning_kwargs) -> LayerPlan:
    """Quantise ``model`` in place according to ``config``; returns the layer plan that was carried out.
    ``on_nonfinite``: "raise" or "keep_float" for layers with NaN/Inf weights or a float16-overflowing range.
    ``gguf_format`` (e.g. "gguf:q4_k_m"): tune on that GGUF file's own grids instead of the integer scheme; the
    model stays float (holding the file's values) and can then be exported in that format only."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model is already quantized")
    start = time.perf_counter()
    plan = plan_layers(model, config)
    source = _weight_source(model, gguf_format)
    apply_nonfinite_policy(model, plan, on_nonfinite, weights=source.planned_weights(plan))
    if gguf_format is not None:
        _quantize_on_gguf_grid(model, plan, config, gguf_format, tokenizer, dataset, progress, tuning_kwargs)
        logger.info("tuned %d layers on the %s grids in %.1f s", len(model.gguf_tuning.types), gguf_format,
                    time.perf_counter() - start)
        return plan
    plan.log("quantizing")
    if config.iters == 0 and dataset is None:
        from .tuning.session import rtn_by_block

        rtn_by_block(model, plan, progress)  # plain rtn_quantize for a model that is all in memory
    else:
        from .tuning import tune_model

        tune_model(model, plan, config, tokenizer=tokenizer, dataset=dataset, progress=progress, **tuning_kwargs)
    record_plan(config, plan)
    mark_quantized(model, config)
    if source.keeps_blocks:  # low-memory mode: the blocks are on disk; kernels attach when they are materialised
        attach_default_kernels(model, config)
    logger.info("quantized %d layers in %.1f s", len(plan.quantized), time.perf_counter() - start)
    return plan


def _weight_source(model: nn.Module, gguf_format: str | None):
    """Where the model's weights are: in memory, in its checkpoint files (low_cpu_mem_usage), or offloaded."""
    from .tuning.weight_source import weight_source

    source = weight_source(model)
    if gguf_format is not None and not source.all_in_memory:
        raise ValueError(f"gguf_format={gguf_format!r}: tuning on a GGUF file's grids needs the whole model in "
                         f"memory (not low_cpu_mem_usage=True, not offloaded by a device_map)")
    return source
