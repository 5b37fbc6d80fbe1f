"""Where a model's float weights live while it is tuned, and how one block's weights are made real.

- in memory (an ordinary model): nothing to do;
- in the checkpoint files (``low_cpu_mem_usage=True``, :mod:`.lazy_blocks`): a block is read when it is tuned and
  dropped again once its packed layers are stored;
- offloaded by accelerate (a ``device_map`` with "disk" or "cpu" offload, :mod:`.offload`): a block's tensors are
  read from its hooks' weights maps and its hooks removed; it stays in memory, packed.

Every source answers ``read(key)``: one float tensor of the model's state dict, in the model's dtype, from wherever
it lives; the weight guard and the resume fingerprint read weights that way without loading whole blocks.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class WeightSource:
    """An ordinary in-memory model: every tensor is already real."""

    keeps_blocks = True  # tuned blocks stay in memory (False: they live in a BlockStore)
    all_in_memory = True  # every tensor is real now (False: some are read only when needed)

    def __init__(self, model: nn.Module):
        self.model = model

    def read(self, key: str) -> torch.Tensor:
        raise KeyError(f"{key} is on the meta device and this model has no place to read it from")

    def load(self, prefix: str, block: nn.Module) -> None:
        """Make every tensor of ``block`` real before it is tuned."""

    def release(self, prefix: str, block: nn.Module) -> None:
        """``block`` is tuned and its packed layers are stored (when a store is used)."""

    def finish(self) -> None:
        """Tuning is over."""

    def tensor(self, key: str, current: torch.Tensor) -> torch.Tensor:
        return self.read(key) if current.is_meta else current

    def float_state(self, prefix: str, block: nn.Module) -> dict[str, torch.Tensor]:
        """The block's state dict with real tensors, without changing the block."""
        return {k: self.tensor(f"{prefix}.{k}", t) for k, t in block.state_dict().items()}

    def planned_weights(self, plan):
        """(name, weight) of every planned layer, read one at a time; None when all are in memory."""
        return None if self.all_in_memory else planned_layer_weights(self, plan)


def weight_source(model: nn.Module) -> WeightSource:
    from .lazy_blocks import lazy_blocks_of
    from .offload import OffloadedBlocks, is_offloaded

    lazy = lazy_blocks_of(model)
    if lazy is not None:
        return lazy
    if is_offloaded(model):
        return OffloadedBlocks(model)
    return WeightSource(model)


def assign_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (a parameter keeps its requires_grad)."""
    owner, _, attr = key.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if attr in module._parameters:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{key} is neither a parameter nor a buffer")


def planned_layer_weights(source: WeightSource, plan):
    """Generator over (name, weight) of the planned layers, reading meta weights through ``source``."""
    for name in plan.quantized:
        weight = source.model.get_submodule(name).weight
        yield name, source.tensor(f"{name}.weight", weight)
