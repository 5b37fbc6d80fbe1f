"""bfloat16 products for the tuned linears of SignRound, on CPUs where they are faster than float32 ones.

SignRound moves each parameter by ``-lr * sign(grad)``, so the gradient only has to point the right way, and the
quantisation error it works against (a few per cent of a weight) is far above bf16's rounding (0.4 %). A CPU
flag is not enough to say whether that is faster: on a Zen 4 (AVX512-BF16) a bf16 product (float32 accumulation,
oneDNN) ran about 2.3x faster than a float32 one, on a virtualised Intel Xeon with AVX512-BF16 but no AMX 0.6x as
fast. So ``bf16_speed`` times products of each kind in interleaved rounds, once per process, on one thread and in
its CPU time, and "auto" uses bf16 only where it measured at least ``MIN_SPEEDUP`` times faster.
Two linears, picked per layer (``MatmulPrecision.matmul``):

- ``bf16_backward_linear``: exact forward; the backward products ``dX = dY W`` and ``dW = dY^T X`` from bf16 copies;
- ``bf16_linear``: forward and backward products from bf16 copies (the copies made for the forward are the ones
  the backward reads); the forward's product is a bf16 tensor (the CPU matmul rounds its float32 accumulator),
  widened back to float32 before the bias is added.

Both return results in the caller's dtypes: the master parameters, the float targets and the propagated
(quantised) block outputs stay float32. The forward of a linear whose outputs become attention logits
(``SCORE_LINEARS``: ``q_proj``, ``k_proj``, fused ``qkv``) stays float32: the softmax turns bf16's relative error
of a large logit (attention sinks) into a large error of the attention weights. In scratch runs (SmolLM2-135M
W4G128, 4 blocks, three seeds) a bf16 forward of every tuned linear gave a worse perplexity than float32 at two
seeds of three, while this split gave a better one at all three.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# last name component of the linears whose outputs are attention queries / keys (Llama, Mistral, Qwen, Phi-3,
# GPT-NeoX / Falcon, GPT-2, MPT, DeepSeek's MLA)
SCORE_LINEARS = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv", "q_a_proj", "q_b_proj",
                 "kv_a_proj_with_mqa", "kv_b_proj")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); whether that is faster is timed."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(check()) for check in checks if check is not None)


MIN_SPEEDUP = 1.2  # a bf16 product must run this many times faster than float32 for "auto" to choose it
PROBE_SHAPE = (1024, 1024, 1024)  # (rows, inputs, outputs) of the timed products
PROBE_ROUNDS = 7  # rounds of the probe, each timing one product of each dtype


@dataclass(frozen=True)
class Bf16Speed:
    """Whether bf16 products pay off on this CPU: ``ratio`` is float32 time / bf16 time (None: not timed, because
    the CPU has no native bf16 and an emulated product is always slower)."""

    ratio: float | None = None

    @property
    def faster(self) -> bool:
        return self.ratio is not None and self.ratio >= MIN_SPEEDUP

    def describe(self) -> str:
        if self.ratio is None:
            return "no native bf16 on this CPU"
        verdict = "faster" if self.faster else f"under the {MIN_SPEEDUP}x that 'auto' asks for"
        return f"a bf16 product ran {self.ratio:.2f}x as fast as a float32 one on this CPU ({verdict})"


@functools.lru_cache(maxsize=None)
def bf16_speed() -> Bf16Speed:
    """Times ``PROBE_SHAPE`` products in float32 and in bf16, once per process: ``PROBE_ROUNDS`` rounds, each timing
    one product of either dtype back to back, on one thread and in that thread's CPU time; the ratio is the median
    over the rounds.

    The choice changes the tuning's results, so load from other processes must not flip it. A thread's CPU time
    leaves out the time it waits descheduled, and with one thread no product waits at a barrier for a descheduled
    partner. Wall-clock timings of two-thread products did not hold (scratch runs on the 2-core machine, 15
    processes while three busy-loop processes ran): in the same interleaved rounds they read 0.54x-1.25x, 4 times
    at 1.2x or more, which would have tuned with bf16 products; the earlier best-of-5 timing of one dtype after the
    other read up to 4.78x. One thread's CPU time read 0.48x-0.64x under that load, and 0.52x-0.59x idle (6
    processes) where the wall-clock two-thread probe read 0.56x-0.63x: both dtypes spread over the cores alike, so
    one thread's ratio is theirs."""
    if not native_bf16():
        return Bf16Speed()
    with one_thread():
        f32, bf16 = probe_operands(torch.float32), probe_operands(torch.bfloat16)
        for x, w in (f32, bf16, f32, bf16):  # warm-up
            F.linear(x, w)
        ratios = [linear_cpu_seconds(*f32) / linear_cpu_seconds(*bf16) for _ in range(PROBE_ROUNDS)]
    return Bf16Speed(ratio=statistics.median(ratios))


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to 1 inside, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_operands(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(x, w)`` in ``dtype`` for ``F.linear`` with ``shape`` (rows, inputs, outputs), the same every time."""
    rows, inputs, outputs = shape
    gen = torch.Generator().manual_seed(0)
    return torch.randn(rows, inputs, generator=gen).to(dtype), torch.randn(outputs, inputs, generator=gen).to(dtype)


def linear_cpu_seconds(x: torch.Tensor, w: torch.Tensor) -> float:
    """CPU seconds the calling thread spends in one ``F.linear(x, w)`` (all of it when torch runs on one thread)."""
    start = time.thread_time()
    F.linear(x, w)
    return time.thread_time() - start


def linear_seconds(x: torch.Tensor, w: torch.Tensor) -> float:
    """Wall seconds of one ``F.linear(x, w)``."""
    start = time.perf_counter()
    F.linear(x, w)
    return time.perf_counter() - start


def product_seconds(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, warmup: int = 2, runs: int = 5,
                    summary=min) -> float:
    """``summary`` (min, or e.g. ``statistics.median``) of ``runs`` timings of ``F.linear`` on ``probe_operands``
    of ``shape`` in ``dtype``, after ``warmup`` untimed calls."""
    x, w = probe_operands(dtype, shape)
    for _ in range(warmup):
        F.linear(x, w)
    return summary([linear_seconds(x, w) for _ in range(runs)])


def scores_attention(name: str) -> bool:
    """Whether the linear ``name`` (any prefix) computes attention queries or keys."""
    return name.rsplit(".", 1)[-1] in SCORE_LINEARS


@dataclass(frozen=True)
class MatmulPrecision:
    """Which products of the tuned linears run in bfloat16: ``forward`` (except ``SCORE_LINEARS``), ``backward``."""

    forward: bool = False
    backward: bool = False

    def matmul(self, name: str):
        """The linear function for the tuned layer ``name``."""
        if self.forward and not scores_attention(name):
            return bf16_linear
        return bf16_backward_linear if self.backward else F.linear

    def describe(self) -> str:
        forward = "bfloat16 (attention query/key projections: float32)" if self.forward else "float32"
        return f"forward products in {forward}, backward products in " \
               f"{'bfloat16' if self.backward else 'float32'}"


def _backward(ctx, grad, xb, wb, dtypes):
    """``(dX, dW, db)`` from the bf16 copies ``xb`` / ``wb``; each in its input's dtype, None where not needed."""
    g = grad.reshape(-1, grad.shape[-1]).to(torch.bfloat16)
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = torch.mm(g, wb).to(dtypes[0]).reshape(xb.shape)
    if ctx.needs_input_grad[1]:
        dw = torch.mm(g.t(), xb.reshape(-1, xb.shape[-1])).to(dtypes[1])
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = grad.reshape(-1, grad.shape[-1]).sum(0).to(dtypes[1])
    return dx, dw, db


class _Bf16BackwardLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        return _backward(ctx, grad, x.to(torch.bfloat16), weight.to(torch.bfloat16), (x.dtype, weight.dtype))


class _Bf16Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        xb, wb = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(xb, wb)
        ctx.has_bias, ctx.dtypes = bias is not None, (x.dtype, weight.dtype)
        y = F.linear(xb, wb).to(x.dtype)
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, grad):
        xb, wb = ctx.saved_tensors
        return _backward(ctx, grad, xb, wb, ctx.dtypes)


def bf16_backward_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its backward products in bfloat16."""
    return _Bf16BackwardLinear.apply(x, weight, bias)


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` with its forward and backward products in bfloat16."""
    return _Bf16Linear.apply(x, weight, bias)
