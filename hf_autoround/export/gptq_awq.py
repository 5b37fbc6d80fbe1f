"""The safetensors formats: plain GPTQ (``auto_gptq``), AWQ (``auto_awq``) and the native format in any packing.

Every quantised layer is unpacked from whatever packing the in-memory model holds and packed again in the target
layout (both steps are exact), so one tuned model can be written in all of them.

- ``auto_gptq``: ``quant_method "gptq"``, ``checkpoint_format "gptq"`` (v1: zero points stored minus one),
  ``desc_act false`` with ``g_idx = i // group_size``; 2/3/4/8 bits. Asymmetric weights are written with a warning:
  a zero point of 0 cannot be stored in v1 and consumers that add one back would read it as 2**bits.
- ``auto_awq``: ``quant_method "awq"``, ``version "gemm"``, ``zero_point = not sym``; 4-bit only.
- ``auto_round:auto_gptq`` / ``auto_round:auto_awq`` / ``auto_round``: ``quant_method "auto-round"`` with that
  ``packing_format``.
"""
from __future__ import annotations

import json
import logging
import os

import torch

from ..formats import canonical_format, get_layout
from ..scheme import QuantScheme

logger = logging.getLogger(__name__)

PLAIN_GPTQ = "auto_gptq"
PLAIN_AWQ = "auto_awq"
NATIVE = ("auto_round", "auto_round:auto_gptq", "auto_round:auto_awq", "auto_round:gptqmodel")
FORMATS = (PLAIN_GPTQ, PLAIN_AWQ) + NATIVE


def _target_packing(fmt: str, model_packing: str | None) -> str:
    if fmt == PLAIN_GPTQ:
        return "auto_round:auto_gptq"
    if fmt == PLAIN_AWQ:
        return "auto_round:auto_awq"
    if fmt == "auto_round":  # the native format keeps whatever packing the model holds
        return canonical_format(model_packing or "auto_round:auto_gptq")
    return canonical_format(fmt)


def check_scheme(fmt: str, scheme: QuantScheme | None, model_packing: str | None = None) -> None:
    """Raise ValueError when ``fmt`` cannot hold weights of ``scheme`` (None = not known yet: nothing to check)."""
    if scheme is None:
        return
    target = _target_packing(fmt, model_packing)
    if target == "auto_round:auto_awq" and scheme.bits != 4:
        raise ValueError(f"format={fmt!r} (AWQ GEMM layout) holds 4-bit weights only, not {scheme.bits}-bit; "
                         f"use auto_gptq or auto_round for {scheme.bits}-bit")
    if target == "auto_round:auto_gptq" and not scheme.sym and fmt == PLAIN_GPTQ:
        logger.warning("format='auto_gptq' with asymmetric weights: GPTQ v1 stores zero points minus one, so a "
                       "zero point of 0 cannot be stored and some consumers misread it; prefer sym=True or "
                       "format='auto_round'")


def _quant_layers(model):
    from ..quant_linear import QuantLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def converted_state_dict(model, packing: str, with_g_idx: bool) -> dict:
    """The model's state dict with every QuantLinear's tensors repacked into ``packing``."""
    layout = get_layout(packing)
    state = dict(model.state_dict())
    for name, layer in _quant_layers(model).items():
        for key in list(layer.packed_tensors()) + ["g_idx"]:
            state.pop(f"{name}.{key}", None)
        qw = layer.unpack()
        reason = layout.can_hold(qw.in_features, qw.out_features, qw.scheme)
        if reason:
            raise ValueError(f"{name}: packing {packing} cannot hold this layer ({reason})")
        if packing != "auto_round:auto_gptq" or qw.scheme.sym or int(qw.zeros.min()) > 0:
            packed = layout.pack(qw)
        else:  # GPTQ v1 cannot store a zero point of 0: it becomes 1 (that group's weights move down one step)
            packed = layout.pack(type(qw)(qw.codes, qw.scales, qw.zeros.clamp(min=1), qw.scheme))
            logger.warning("%s: a zero point of 0 is stored as 1 in GPTQ v1 (weights in that group move by one "
                           "quantisation step); use format='auto_round' to keep them exact", name)
        for key, tensor in packed.items():
            state[f"{name}.{key}"] = tensor.contiguous()
        if with_g_idx:
            state[f"{name}.g_idx"] = qw.group_index().to(torch.int32)
    return state


def _single_scheme(config, layers) -> QuantScheme:
    schemes = {layer.spec.scheme for layer in layers.values()}
    if len(schemes) > 1:
        raise ValueError(f"plain GPTQ/AWQ checkpoints hold one scheme for all layers; this model mixes "
                         f"{sorted(s.describe() for s in schemes)}: write format='auto_round' instead")
    return next(iter(schemes)) if schemes else config.scheme


def _kept_float(config) -> list[str]:
    return sorted(k for k, v in (config.extra_config or {}).items() if v.get("bits", 0) >= 16)


def plain_config(fmt: str, config, scheme: QuantScheme) -> dict:
    common = {"bits": scheme.bits, "group_size": scheme.group_size}
    not_converted = _kept_float(config)
    if fmt == PLAIN_GPTQ:
        out = {"quant_method": "gptq", **common, "sym": scheme.sym, "desc_act": False, "static_groups": False,
               "true_sequential": True, "checkpoint_format": "gptq", "lm_head": bool(config.quant_lm_head),
               "damp_percent": 0.01}
    else:
        out = {"quant_method": "awq", **common, "zero_point": not scheme.sym, "version": "gemm"}
    if not_converted:
        out["modules_to_not_convert"] = not_converted
    if config.block_name_to_quantize:  # read by us (and ignored by other consumers)
        out["block_name_to_quantize"] = config.block_name_to_quantize
    return out


def save_safetensors(state: dict, directory: str, max_shard_bytes: int = 5 * 2**30) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus the standard index file."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous().clone()  # no shared storage (save_file refuses it)
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _rewrite_config(directory: str, qconfig: dict) -> None:
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data["quantization_config"] = qconfig
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(directory, "quantization_config.json"), "w", encoding="utf-8") as f:
        json.dump(qconfig, f, indent=2)
        f.write("\n")


def preflight(model, tokenizer, fmt: str):
    """Every check ``write`` makes before writing anything; returns (config, layers, scheme of plain formats)."""
    config = getattr(model.config, "quantization_config", None)
    layers = _quant_layers(model)
    if config is None or not layers:
        raise ValueError(f"format={fmt!r} writes a quantized model; this model has no quantized layers "
                         f"(quantize it first, or export a GGUF, which quantizes float weights itself)")
    from ..config import AutoRoundConfig

    config = AutoRoundConfig.coerce(config)
    scheme = None
    if fmt in (PLAIN_GPTQ, PLAIN_AWQ):
        scheme = _single_scheme(config, layers)
        check_scheme(fmt, scheme)
    else:
        for layer_scheme in {layer.spec.scheme for layer in layers.values()}:
            check_scheme(fmt, layer_scheme, config.packing_format)
    return config, layers, scheme


def write(model, tokenizer, directory: str, fmt: str) -> None:
    config, layers, scheme = preflight(model, tokenizer, fmt)
    packing = _target_packing(fmt, config.packing_format)
    state = converted_state_dict(model, packing, with_g_idx=fmt == PLAIN_GPTQ)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    save_safetensors(state, directory)
    if fmt in (PLAIN_GPTQ, PLAIN_AWQ):
        qconfig = plain_config(fmt, config, scheme)
    else:
        qconfig = config.to_dict()
        qconfig["packing_format"] = packing
    _rewrite_config(directory, qconfig)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
