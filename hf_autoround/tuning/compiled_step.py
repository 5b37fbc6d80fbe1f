"""The block loss of one SignRound step, optionally through ``torch.compile`` (``enable_torch_compile=True``).

Eagerly, a step of a SmolLM2-135M block spends part of its time outside the matrix products: the
elementwise work of the fake-quantiser, the norms, the rotary embedding, the gated MLP and the loss, each a pass
over a few MB, forward and backward. Inductor fuses those passes. The block is an argument of the compiled
function, so every block of a model with one block class reuses the first block's graph: the compile is paid once
per process (and its kernels are cached on disk by inductor for later processes).

The fake-quantised weights are bit-identical to the eager ones (so the checkpoint stores exactly what was tuned),
but fused kernels sum in another order, so losses and gradients differ in the last bits and a compiled run is not
bit-identical to an eager one; it is reproducible run to run.
If compiling fails (no C++ compiler, an operation dynamo cannot trace), the step falls back to eager once, with a
warning that says why, and stays eager for the rest of the process.
"""
from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn as nn

from .block_loss import block_loss
from .cache import block_output

logger = logging.getLogger(__name__)


def eager_loss(block: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict, target: torch.Tensor,
               mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """``block_loss`` of the block's output on ``x`` (its other arguments ``args`` / ``kwargs``) against ``target``."""
    return block_loss(block_output(block(x, *args, **kwargs)), target, mask, kind)


class CompiledLoss:
    """``eager_loss`` through ``torch.compile``; eager again after a failed compile."""

    def __init__(self):
        # emulate_precision_casts: keep the float16 rounding of the scales inside fused kernels (inductor drops
        # such round trips by default), so the compiled fake-quantised weights equal ``qdq.qdq``'s bit for bit
        self.fn = torch.compile(eager_loss, dynamic=False, options={"emulate_precision_casts": True})
        self.failure: str | None = None
        self.compiled_once = False

    def __call__(self, *args) -> torch.Tensor:
        if self.failure is not None:
            return eager_loss(*args)
        if self.compiled_once:
            return self.fn(*args)
        return self._first_call(args)

    def _first_call(self, args) -> torch.Tensor:
        logger.info("torch.compile: compiling the block step (once per process; later blocks reuse it)")
        start = time.perf_counter()
        try:
            loss = self.fn(*args)
        except Exception as error:  # any compile failure: the step is still well defined eagerly
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            logger.warning("torch.compile of the block step failed (%s); tuning continues eagerly", self.failure)
            return eager_loss(*args)
        self.compiled_once = True
        logger.info("torch.compile: block step compiled in %.1f s", time.perf_counter() - start)
        return loss


@functools.lru_cache(maxsize=1)
def compiled_loss() -> CompiledLoss:
    """The process's one compiled step (so its graph is shared by every block and every run)."""
    return CompiledLoss()


def step_loss(compile: bool):
    """The function a SignRound step computes its loss with (``eager_loss``'s signature)."""
    return compiled_loss() if compile else eager_loss
