"""The native format of a model tuned with ``low_cpu_mem_usage=True``, written without bringing it into memory.

Such a model's blocks are meta tensors: their packed layers lie in the block store, their other tensors (norms) in
the source checkpoint (:mod:`hf_autoround.tuning.lazy_blocks`). ``write`` lists every tensor of the model's state
dict with its dtype and shape, assigns them to shards exactly as :func:`.gptq_awq.save_safetensors` does (sorted
names, the same size limit, file names and index), and writes each shard tensor by tensor, reading each one only
then: peak memory is one tensor. Config, generation config, ``quantization_config.json`` and tokenizer are written
as :func:`.gptq_awq.write` writes them. The tensors equal those of the in-memory writer (tested); the byte layout
inside a file may differ (safetensors orders its data by dtype, this writer by name).

Only the model's own packing streams (``auto_round`` and the ``auto_round:*`` format naming that packing); any
other format materialises the quantised model first (``export_model`` does that).
"""
from __future__ import annotations

import json
import os

from ..formats import canonical_format
from ..safetensors_io import TensorEntry, write_tensors
from . import gptq_awq

MAX_SHARD_BYTES = 5 * 2**30  # gptq_awq.save_safetensors' default


def can_stream(model, fmt: str) -> bool:
    """Whether ``fmt`` of this (lazily tuned) model can be written tensor by tensor."""
    from ..tuning.lazy_blocks import lazy_blocks_of

    config = getattr(model.config, "quantization_config", None)
    if lazy_blocks_of(model) is None or config is None or fmt not in gptq_awq.NATIVE:
        return False
    packing = canonical_format(getattr(config, "packing_format", None) or "auto_round:auto_gptq")
    return gptq_awq._target_packing(fmt, packing) == packing


def shard_plan(entries: list[TensorEntry], max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[TensorEntry]]:
    """Entries (sorted by name) split into shards as ``save_safetensors`` splits a state dict."""
    shards, current, size = [], [], 0
    for e in sorted(entries, key=lambda e: e.name):
        if current and size + e.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    shards.append(current)
    return shards


def write(model, tokenizer, directory: str, fmt: str) -> None:
    from ..tuning.lazy_blocks import lazy_blocks_of

    config, _, _ = gptq_awq.preflight(model, tokenizer, fmt)
    lazy = lazy_blocks_of(model)
    state = model.state_dict(keep_vars=True)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    entries = [TensorEntry(k, t.dtype, tuple(t.shape), lazy.loader(k, t)) for k, t in state.items()]
    model.config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(directory)
    write_shards(entries, directory)
    qconfig = config.to_dict()
    qconfig["packing_format"] = gptq_awq._target_packing(fmt, config.packing_format)
    gptq_awq._rewrite_config(directory, qconfig)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def write_shards(entries: list[TensorEntry], directory: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or numbered shards plus the standard index file."""
    shards = shard_plan(entries, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        write_tensors(os.path.join(directory, "model.safetensors"), shards[0], metadata)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_tensors(os.path.join(directory, name), shard, metadata)
        weight_map.update({e.name: name for e in shard})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
