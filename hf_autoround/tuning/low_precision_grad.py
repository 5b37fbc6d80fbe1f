"""A linear whose forward is exact and whose backward matmuls run in bfloat16, for SignRound on CPUs with native bf16.

SignRound moves each parameter by ``-lr * sign(grad)``, so the gradient only has to point the right way, while the
loss that picks the kept parameters must be exact. ``bf16_backward_linear`` keeps the forward (and so every loss and
the float targets) in the caller's dtype and computes the two backward products, ``dX = dY W`` and ``dW = dY^T X``,
from bfloat16 copies with float32 accumulation (oneDNN), then returns them in the original dtypes: the master
parameters stay float32. On a CPU with AVX512-BF16 or AMX those products run about 2x faster than in float32; the
forward stays float32, unlike bf16 autocast (``amp=True``), which rounds the forward too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), i.e. where bf16 matmuls are faster."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


class _Bf16BackwardLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(g, weight.to(torch.bfloat16)).to(x.dtype).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = torch.mm(g.t(), x.reshape(-1, x.shape[-1]).to(torch.bfloat16)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = grad.reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, db


def bf16_backward_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its backward products in bfloat16 (see the module docstring)."""
    return _Bf16BackwardLinear.apply(x, weight, bias)
