"""``InputHooks``: a context manager that shows each named submodule's input to ``observe`` while it is open, the
base of the statistics gathered on a block's forward passes (optimised-RTN sums, channel-scaling Gram matrices,
the quality report's first inputs)."""
from __future__ import annotations

import torch
import torch.nn as nn


class InputHooks:
    def __init__(self, block: nn.Module, names):
        self.block, self.names, self.handles = block, list(names), []

    def observe(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _hook(self, name):
        def hook(module, args):
            self.observe(name, args[0].detach())
        return hook

    def __enter__(self):
        self.handles = [self.block.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in self.names]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
