"""The transformers ``HfQuantizer`` for AutoRound: a thin adapter over config, layer plan, formats and backends.

Quantize path (float checkpoint + our config): weights load as usual; the after-load hook attaches
``model.quantize(...)``. Pre-quantized path: the before-load hook checks the checkpoint headers against the plan and
swaps planned linears for empty ``QuantLinear`` s on meta; the weights load into their buffers; the after-load hook
attaches kernels.
"""
from __future__ import annotations

import logging
import types

from transformers.quantizers.base import HfQuantizer

from .config import AutoRoundConfig

logger = logging.getLogger(__name__)


def _quantize_method(model, tokenizer=None, dataset=None, **kwargs):
    """``model.quantize(tokenizer=None, dataset=None, **tuning_kwargs)``: run AutoRound with the model's config."""
    from .quantize import quantize_model

    config = model.hf_quantizer.quantization_config
    return quantize_model(model, config, tokenizer=tokenizer, dataset=dataset, **kwargs)


class AutoRoundHfQuantizer(HfQuantizer):
    requires_calibration = False

    def __init__(self, quantization_config, **kwargs):
        super().__init__(AutoRoundConfig.coerce(quantization_config), **kwargs)
        self.plan = None

    def validate_environment(self, *args, device_map=None, **kwargs):
        self.device_map = device_map

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs):
        if not self.pre_quantized:
            return
        from .checkpoint import read_headers, validate_against_plan
        from .convert import replace_with_empty_quant_linears
        from .layers import plan_layers

        plan = plan_layers(model, self.quantization_config)
        validate_against_plan(plan, read_headers(checkpoint_files), model)
        replace_with_empty_quant_linears(model, plan, dtype=dtype)
        plan.log("loading")
        self.plan = plan

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.pre_quantized:
            from .backends import attach_kernels
            from .checkpoint import validate_loaded_zero_points

            validate_loaded_zero_points(model)
            attach_kernels(model, forced=self.quantization_config.backend, dtype=model.dtype)
        else:
            model.quantize = types.MethodType(_quantize_method, model)
        return model

    def is_serializable(self, *args, **kwargs):
        return True

    @property
    def is_trainable(self) -> bool:
        return False
