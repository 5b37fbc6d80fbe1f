"""Block-input caching: capture what the first transformer block receives, then run blocks on cached inputs.

A forward pre-hook (with kwargs) on the first block records its hidden states (first positional argument, or the
``hidden_states`` keyword) and every other argument (attention mask, position ids, position embeddings, ...), then
stops the forward. Samples are captured one at a time (batch 1), so per-sample tensors stack along dim 0 and tensors
that are the same for every sample (causal masks, rotary embeddings) are stored once and broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .data import CalibrationData

_DROP_KWARGS = ("past_key_value", "past_key_values", "cache", "use_cache", "output_attentions", "layer_past")


class _Captured(Exception):
    """Raised by the capture hook to stop the model forward after the first block's inputs are seen."""


@dataclass
class BlockInputs:
    """``hidden`` ``[n, seq, dim]`` plus the other block arguments.

    ``shared``: keyword arguments identical for every sample (batch dim 1, broadcast); ``per_sample``: keyword
    arguments stacked along dim 0; ``extra_args``: positional arguments after the hidden states (shared).
    ``token_mask``: ``[n, seq]`` with 0 at padding, or None when every token is real.
    """

    hidden: torch.Tensor
    shared: dict = field(default_factory=dict)
    per_sample: dict = field(default_factory=dict)
    extra_args: tuple = ()
    token_mask: torch.Tensor | None = None

    @property
    def nsamples(self) -> int:
        return self.hidden.shape[0]

    def kwargs_for(self, indices: torch.Tensor) -> dict:
        kwargs = dict(self.shared)
        for key, value in self.per_sample.items():
            kwargs[key] = _index(value, indices)
        return kwargs

    def select(self, indices: torch.Tensor) -> "BlockInputs":
        """The inputs of the samples ``indices`` only (shared arguments are kept as they are)."""
        mask = None if self.token_mask is None else self.token_mask.index_select(0, indices)
        per_sample = {key: _index(value, indices) for key, value in self.per_sample.items()}
        return BlockInputs(self.hidden.index_select(0, indices), self.shared, per_sample, self.extra_args, mask)


def _index(value, indices):
    if isinstance(value, torch.Tensor):
        return value.index_select(0, indices)
    if isinstance(value, tuple):
        return tuple(_index(v, indices) for v in value)
    return value


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (not isinstance(a, (torch.Tensor, tuple)) and a == b)


def _stack(values):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values, dim=0)
    if isinstance(values[0], tuple):
        return tuple(_stack([v[i] for v in values]) for i in range(len(values[0])))
    raise ValueError(f"block argument of type {type(values[0]).__name__} differs between samples; cannot batch it")


def _split_kwargs(records: list[dict]) -> tuple[dict, dict]:
    shared, per_sample = {}, {}
    for key, first in records[0].items():
        values = [r.get(key) for r in records]
        if all(_same(first, v) for v in values[1:]):
            shared[key] = first
        else:
            per_sample[key] = _stack(_causal_where_missing(values) if key == "attention_mask" else values)
    return shared, per_sample


def _causal_where_missing(masks: list) -> list:
    """transformers hands a block no attention mask (None: plain causal attention) for a sample without padding,
    and a materialised 4-D mask for a padded one. To batch a mix, each missing mask becomes the causal mask in the
    form of the materialised ones: bool (True = attend) or additive float (0, or the dtype's minimum)."""
    present = next((m for m in masks if isinstance(m, torch.Tensor)), None)
    if present is None or present.dim() != 4:
        return masks
    q, k = present.shape[-2:]
    allowed = torch.ones(q, k, dtype=torch.bool, device=present.device).tril(k - q)
    if present.dtype == torch.bool:
        causal = allowed
    else:
        causal = torch.zeros(q, k, dtype=present.dtype, device=present.device)
        causal.masked_fill_(~allowed, torch.finfo(present.dtype).min)
    causal = causal.expand(present.shape).contiguous()
    return [causal if m is None else m for m in masks]


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value


def _store_sample(cache: dict, index: int, nsamples: int, hidden: torch.Tensor, dtype: torch.dtype | None) -> None:
    """Copy one sample's hidden states (``[1, seq, dim]``) into row ``index`` of ``cache["hidden"]``, allocated once
    for all samples (stacking a list at the end would hold every sample twice)."""
    if "hidden" not in cache:
        cache["hidden"] = torch.empty((nsamples,) + tuple(hidden.shape[1:]), dtype=dtype or hidden.dtype,
                                      device=hidden.device)
    cache["hidden"][index].copy_(hidden[0])


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, data: CalibrationData,
                         cache_dtype: torch.dtype | None = None) -> BlockInputs:
    """Run each calibration sample through ``model`` up to ``block`` and return what the block was called with."""
    records, extra, cache = [], [], {}

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        _store_sample(cache, len(records), data.nsamples, hidden.detach(), cache_dtype)
        extra[:] = [_detach(a) for a in args[1:]]
        for key in _DROP_KWARGS:
            kwargs.pop(key, None)
        records.append({k: _detach(v) for k, v in kwargs.items()})
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))  # meta: offloaded
    try:
        for i in range(data.nsamples):
            call = {"input_ids": data.input_ids[i:i + 1].to(device), "use_cache": False}
            if data.attention_mask is not None:
                call["attention_mask"] = data.attention_mask[i:i + 1].to(device)
            try:
                model(**call)
            except _Captured:
                pass
    finally:
        handle.remove()
    if len(records) != data.nsamples:
        raise RuntimeError("the first transformer block was not reached by the model forward; check block names")
    shared, per_sample = _split_kwargs(records)
    return BlockInputs(cache["hidden"], shared, per_sample, tuple(extra), data.attention_mask)


def block_output(out) -> torch.Tensor:
    """Blocks return a tensor or a tuple whose first element is the hidden states."""
    return out[0] if isinstance(out, (tuple, list)) else out


def forward_block(block: nn.Module, inputs: BlockInputs, hidden: torch.Tensor, indices: torch.Tensor,
                  compute_dtype: torch.dtype) -> torch.Tensor:
    """Block output for the samples ``indices`` of ``hidden`` (which may differ from ``inputs.hidden``)."""
    x = hidden.index_select(0, indices).to(compute_dtype)
    return block_output(block(x, *inputs.extra_args, **inputs.kwargs_for(indices)))


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, hidden: torch.Tensor, batch_size: int,
              compute_dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of ``block`` for every sample of ``hidden``, computed in batches in ``compute_dtype`` and stored in
    ``hidden``'s dtype (the cache's).

    ``into``: a tensor to write the outputs into, which may be ``hidden`` itself (a batch's rows are copied out
    before its outputs are written back), so that a pass over the calibration set needs no second copy of it. It is
    used when its shape and dtype are those of the outputs; otherwise a new tensor is allocated."""
    out = None
    for start in range(0, hidden.shape[0], batch_size):
        idx = torch.arange(start, min(start + batch_size, hidden.shape[0]))
        y = forward_block(block, inputs, hidden, idx, compute_dtype)
        if out is None:
            shape, dtype = (hidden.shape[0],) + tuple(y.shape[1:]), hidden.dtype
            fits = into is not None and tuple(into.shape) == shape and into.dtype == dtype
            out = into if fits else torch.empty(shape, dtype=dtype)
        out[start:start + len(idx)] = y
    return out
