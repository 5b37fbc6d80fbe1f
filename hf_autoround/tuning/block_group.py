"""Several consecutive blocks tuned as one unit (``nblocks``): one module that runs them in order.

Each step of SignRound then computes the loss at the output of the last block of the group, so the rounding of
an early block is chosen for its effect on the later ones. The blocks stay where they are in the model; the
group only holds references, named by their index in the container, so that a layer ``"3.mlp.down_proj"`` of
the group is ``"<container>.3.mlp.down_proj"`` of the model.
"""
from __future__ import annotations

import torch.nn as nn

from .cache import block_output


class BlockGroup(nn.Module):
    def __init__(self, indices: list[int], blocks: list[nn.Module]):
        super().__init__()
        if len(indices) != len(blocks) or not blocks:
            raise ValueError("BlockGroup needs one index per block and at least one block")
        for index, block in zip(indices, blocks):
            self.add_module(str(index), block)

    def forward(self, hidden, *args, **kwargs):
        """Every block gets the previous one's hidden states and the same other arguments (attention mask,
        position embeddings), as in the model's own loop; returns the last block's output as it is."""
        out = None
        for block in self.children():
            out = block(hidden, *args, **kwargs)
            hidden = block_output(out)
        return out


def group_indices(first: int, last: int, nblocks: int) -> list[list[int]]:
    """Blocks ``first..last`` in consecutive groups of ``nblocks`` (the last group may be shorter)."""
    return [list(range(i, min(i + nblocks, last + 1))) for i in range(first, last + 1, nblocks)]
