"""Tuning a model that accelerate dispatched with offloaded modules (``from_pretrained(..., device_map=...)`` with
"disk" entries, or "cpu" entries next to an accelerator).

An offloaded module's parameters sit on the meta device; its ``AlignDevicesHook`` (``offload=True``) reads them from
its ``weights_map`` before each forward and drops them after. Tuning reads and replaces weights directly, so before
a block is tuned its tensors are read from the hooks' weights maps (cast to the dtype the model holds them in) and
its hooks are removed; the tuned block then stays in memory, packed. When tuning ends every module that is still
offloaded (blocks after the last planned one, offloaded embeddings or heads) is brought into memory the same way,
so the model can be saved. Reading from the weights map gives exactly the tensors a non-offloaded load holds, so
the result equals the non-offloaded run's (tested). Execution devices are not used: this build tunes on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .weight_source import WeightSource, assign_tensor


def offload_hook(module: nn.Module):
    """The module's accelerate hook that offloads its weights, or None."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", [hook]) if hook is not None else []:
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h
    return None


def is_offloaded(model: nn.Module) -> bool:
    return any(offload_hook(m) is not None for m in model.modules())


class OffloadedBlocks(WeightSource):
    """A dispatched model: offloaded tensors come from the accelerate hooks' weights maps."""

    all_in_memory = False

    def read(self, key: str) -> torch.Tensor:
        owner, _, attr = key.rpartition(".")
        module = self.model.get_submodule(owner) if owner else self.model
        hook = offload_hook(module)
        if hook is None:
            raise KeyError(f"{key} is on the meta device but its module has no offload hook to read it from")
        current = getattr(module, attr)
        return hook.weights_map[attr].to(device="cpu", dtype=current.dtype, copy=True)

    def load(self, prefix: str, block: nn.Module) -> None:
        from accelerate.hooks import remove_hook_from_module

        tensors = list(block.named_parameters(remove_duplicate=False)) + list(block.named_buffers())
        for key, t in tensors:
            if t.is_meta:
                assign_tensor(block, key, self.read(f"{prefix}.{key}" if prefix else key))
        remove_hook_from_module(block, recurse=True)

    def finish(self) -> None:
        for name, module in list(self.model.named_modules()):
            if offload_hook(module) is not None:
                self.load(name, module)
