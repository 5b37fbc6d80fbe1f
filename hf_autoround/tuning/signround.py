"""The SignRound loop for one transformer block (DESIGN.md §4).

Every planned linear of the block is swapped for a ``QdqLinear`` that computes its weight with
``qdq.qdq(W, scheme, V, min_scale, max_scale)`` (fused in ``fakequant``); ``V`` (init 0, clamped to [-0.5, 0.5]) and the per-group
``min_scale`` / ``max_scale`` (init 1, clamped to [0, 1]) are the only trainable tensors. (A layer whose target
is a GGUF grid, ``GridWeight``, is swapped for a ``GridQdqLinear``: its grid's scales are fixed, only ``V`` moves.)
Each step draws one batch, computes the (padding-masked) loss between the block on its quantized inputs and the float
targets (by default each token's squared error relative to its target's power, ``block_loss``), and moves
every parameter by ``-lr * sign(d)`` with ``lr`` decaying linearly to 0. ``d`` is the gradient, except that with
``SignRoundSettings.momentum > 0`` it is, for ``V``, a short running average of the gradients (``RoundingMomentum``;
GGUF-grid tuning included). The parameters of the step with the lowest loss are the ones kept.
A step's batch runs forward and backward in chunks of at most ``SignRoundSettings.chunk_tokens`` tokens (whole
samples), which share the step's fake-quantised weights (``StepWeights``): memory is bounded, the result is not
changed.
``SignRoundSettings.bf16`` says which of the wrapped linears' products run in bf16 (``bf16_matmul``); the float
targets and the block outputs handed on are computed outside the loop, in float32. ``SignRoundSettings.compile``
computes each step's block forward and loss through ``torch.compile`` (``compiled_step``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..convert import set_submodule
from ..export.gguf.grid import GridWeight
from ..scheme import QuantScheme
from .bf16_matmul import MatmulPrecision
from .block_loss import LOSSES, block_loss
from .cache import BlockInputs
from .compiled_step import step_loss
from .fakequant import GroupedWeight, fake_quant

V_LIMIT = 0.5


@dataclass
class LayerParams:
    """The tunable state of one linear: ``v`` ``[out, n_groups, g]``, ``min_scale`` / ``max_scale`` ``[out, n_groups]``."""

    v: torch.Tensor
    min_scale: torch.Tensor
    max_scale: torch.Tensor

    @classmethod
    def initial(cls, weight: torch.Tensor, target: "Target") -> "LayerParams":
        out_f, in_f = weight.shape
        if isinstance(target, GridWeight):  # the grid's scales are fixed: one untuned placeholder per row
            return cls(torch.zeros(out_f, in_f), torch.ones(out_f, 1), torch.ones(out_f, 1))
        n_groups, g = target.n_groups(in_f), target.group_len(in_f)
        return cls(torch.zeros(out_f, n_groups, g), torch.ones(out_f, n_groups), torch.ones(out_f, n_groups))

    def clone(self) -> "LayerParams":
        return LayerParams(self.v.detach().clone(), self.min_scale.detach().clone(), self.max_scale.detach().clone())

    def copy_(self, other: "LayerParams") -> None:
        with torch.no_grad():
            self.v.copy_(other.v)
            self.min_scale.copy_(other.min_scale)
            self.max_scale.copy_(other.max_scale)


Target = QuantScheme | GridWeight  # what a layer is tuned for: an integer scheme, or a GGUF type's grid


@dataclass
class SignRoundSettings:
    iters: int = 200
    lr: float | None = None  # None: 1 / iters
    minmax_lr: float | None = None  # None: lr
    batch_size: int = 8
    gradient_accumulate_steps: int = 1
    enable_minmax_tuning: bool = True
    seed: int = 42
    compute_dtype: torch.dtype = torch.float32
    amp: bool = False  # bf16 autocast for the block forward (fp32 master parameters)
    bf16: MatmulPrecision = MatmulPrecision()  # which products of the tuned linears run in bf16 (bf16_matmul)
    loss: str = "relative"  # per-token relative MSE, or "mse", the reference's plain MSE (block_loss)
    momentum: float = 0.0  # beta of V's sign-of-momentum step (RoundingMomentum); 0: the reference's sign(grad)
    compile: bool = False  # the step's forward and loss through torch.compile (compiled_step)
    chunk_tokens: int = 2048  # the most tokens one forward / backward of a step (or of a pass) runs at once

    def chunk_samples(self, seqlen: int) -> int:
        """Samples per forward / backward: a step's (and a pass's) batch runs in chunks of at most this many, so that
        activation memory stays bounded whatever ``batch_size x seqlen``; never more than ``batch_size``, at least 1.
        Chunking does not change a step's result (``_batch_loss`` weights each chunk by its share of real tokens)."""
        return max(1, min(self.batch_size, self.chunk_tokens // max(seqlen, 1)))

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {LOSSES}")
        valid = isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool)
        if not valid or not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum!r}: expected a number in [0, 1)")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens={self.chunk_tokens!r}: expected a positive number of tokens")

    @property
    def round_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)

    @property
    def scale_lr(self) -> float:
        return self.minmax_lr if self.minmax_lr is not None else self.round_lr


@dataclass
class BlockResult:
    params: dict[str, LayerParams]  # the kept (best-loss) parameters, by layer name relative to the block
    first_loss: float = float("nan")
    best_loss: float = float("nan")
    best_iter: int = -1
    losses: list[float] = field(default_factory=list)


class QdqLinear(nn.Module):
    """A linear whose weight is fake-quantised (the values of ``qdq.qdq``) from the float weight and the layer's
    tunable parameters; the grouped weight and its ranges are computed once, at wrapping."""

    def __init__(self, linear: nn.Linear, scheme: QuantScheme, params: LayerParams, matmul=F.linear):
        super().__init__()
        self.linear, self.scheme, self.params, self.matmul = linear, scheme, params, matmul
        self.grouped = GroupedWeight.from_weight(linear.weight, scheme)

    step_weight: torch.Tensor | None = None  # set by ``StepWeights`` while a step shares one weight among its chunks

    def quantized_weight(self) -> torch.Tensor:
        p = self.params
        return fake_quant(self.grouped, self.scheme, p.v, p.min_scale, p.max_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.quantized_weight() if self.step_weight is None else self.step_weight
        return self.matmul(x, w_hat.to(x.dtype), self.linear.bias)


class GridQdqLinear(nn.Module):
    """A linear whose weight takes the values of its GGUF grid for the tunable rounding ``params.v``."""

    def __init__(self, linear: nn.Linear, grid: GridWeight, params: LayerParams, matmul=F.linear):
        super().__init__()
        self.linear, self.grid, self.params, self.matmul = linear, grid, params, matmul

    step_weight: torch.Tensor | None = None  # as ``QdqLinear.step_weight``

    def quantized_weight(self) -> torch.Tensor:
        return self.grid.fake_quant(self.linear.weight, self.params.v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.quantized_weight() if self.step_weight is None else self.step_weight
        return self.matmul(x, w_hat.to(x.dtype), self.linear.bias)


class StepWeights:
    """The fake-quantised weights of one step, computed once and shared by the step's chunks.

    Each wrapper reads a detached copy of its weight, a leaf that sums the gradients of every chunk's backward;
    ``backward`` then takes that sum through the fake-quantiser once, to ``V`` and the range scales. The
    gradients equal those of one graph over the whole batch, and the fake-quantiser runs once per step instead of
    once per chunk."""

    def __init__(self, wrappers: list[nn.Module]):
        self.wrappers = wrappers
        self.graphs = [w.quantized_weight() for w in wrappers]
        for wrapper, graph in zip(wrappers, self.graphs):
            wrapper.step_weight = graph.detach().requires_grad_(graph.requires_grad)

    def backward(self) -> None:
        pairs = [(g, w.step_weight.grad) for g, w in zip(self.graphs, self.wrappers) if w.step_weight.grad is not None]
        if pairs:
            torch.autograd.backward([g for g, _ in pairs], [grad for _, grad in pairs])

    def release(self) -> None:
        for wrapper in self.wrappers:
            wrapper.step_weight = None
        self.graphs = []


def _wrapper(linear: nn.Linear, target: Target, params: LayerParams, matmul) -> nn.Module:
    if isinstance(target, GridWeight):
        return GridQdqLinear(linear, target, params, matmul)
    return QdqLinear(linear, target, params, matmul)


@contextlib.contextmanager
def wrapped(block: nn.Module, layers: dict[str, Target], params: dict[str, LayerParams],
            bf16: MatmulPrecision = MatmulPrecision()):
    """Swap the block's planned linears for fake-quantising ones while inside the context (which yields them, by
    name); restore them after. ``bf16``: where their products run in bfloat16 (the default, float32, is exact)."""
    originals = {name: block.get_submodule(name) for name in layers}
    wrappers = {name: _wrapper(linear, layers[name], params[name], bf16.matmul(name))
                for name, linear in originals.items()}
    for name, wrapper in wrappers.items():
        set_submodule(block, name, wrapper)
    try:
        yield wrappers
    finally:
        for name, linear in originals.items():
            set_submodule(block, name, linear)


class BatchSampler:
    """Shuffled batches without replacement; reshuffles when fewer than a batch remain. Indices sorted per batch."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n, self.batch = n, min(batch, n)
        self.gen = torch.Generator().manual_seed(seed)
        self.order, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx.sort().values


class RoundingMomentum:
    """The direction of V's steps: ``m = beta m + (1 - beta) grad`` (``m`` starts at the first gradient), and V
    moves by ``-lr sign(m)``: signed SGD with momentum ("signum"). With ``beta = 0`` it is the plain gradient.

    Why: a step sees 8 of the calibration samples, so the sign of one batch's gradient flips from step to step
    on many weights, and at 50 steps V has no room to average that out. Off by default: with ``beta = 0.5`` the
    whole-model perplexity gap of SmolLM2-135M W4G128 at iters 50 fell by 6.5 % over three seeds, but on 4 blocks
    it was 0.02-0.10 worse per seed, and on the whole model at iters 200 (the default recipe) it was 14 % worse at
    the one seed measured (README, *Measured*). ``beta = 0.9`` reacts too slowly for 50 linearly decaying steps
    and was far worse. The range scales keep the plain gradient's sign."""

    def __init__(self, beta: float):
        self.beta, self.buffers = beta, None

    def directions(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.beta == 0:
            return grads
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
            return self.buffers
        for m, g in zip(self.buffers, grads):
            m.mul_(self.beta).add_(g, alpha=1 - self.beta)
        return self.buffers


def _step(params: list[LayerParams], lr: float, scale_lr: float, tune_scales: bool,
          momentum: RoundingMomentum) -> None:
    with torch.no_grad():
        vs = [p.v for p in params]
        torch._foreach_add_(vs, torch._foreach_sign(momentum.directions([v.grad for v in vs])), alpha=-lr)
        for v in vs:
            v.clamp_(-V_LIMIT, V_LIMIT)
            v.grad = None
        if not tune_scales:
            return
        scales = [t for p in params for t in (p.min_scale, p.max_scale) if t.grad is not None]
        if not scales:
            return
        torch._foreach_add_(scales, torch._foreach_sign([s.grad for s in scales]), alpha=-scale_lr)
        for s in scales:
            s.clamp_(0.0, 1.0)
            s.grad = None


def _batch_loss(block, inputs: BlockInputs, q_hidden, targets, idx, settings: SignRoundSettings,
                wrappers: list[nn.Module]) -> float:
    """Forward + backward of one step's samples ``idx``, in chunks of ``settings.chunk_samples``; returns the loss.

    Each chunk's loss is weighted by its share of the step's real tokens, so their sum is the loss of the whole
    batch. With more than one chunk, the fake-quantised weights are computed once for the step (``StepWeights``)."""
    chunks = idx.split(settings.chunk_samples(q_hidden.shape[1]))
    shares = _token_shares(inputs.token_mask, chunks, q_hidden.shape[1])
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if settings.amp else contextlib.nullcontext()
    loss_of = step_loss(settings.compile)
    shared = StepWeights(wrappers) if len(chunks) > 1 else None
    total = 0.0
    try:
        for sub, share in zip(chunks, shares):
            x = q_hidden.index_select(0, sub).to(settings.compute_dtype)
            mask = None if inputs.token_mask is None else inputs.token_mask.index_select(0, sub)
            with amp:  # the loss itself is float32 either way (block_loss upcasts)
                loss = loss_of(block, x, inputs.extra_args, inputs.kwargs_for(sub), targets.index_select(0, sub),
                               mask, settings.loss)
            loss = loss * share
            loss.backward()
            total += loss.item()
        if shared is not None:
            shared.backward()
    finally:
        if shared is not None:
            shared.release()
    return total


def _token_shares(token_mask: torch.Tensor | None, chunks: tuple[torch.Tensor, ...], seqlen: int) -> list[float]:
    """Each chunk's share of the real tokens of the step (of its samples without a padding mask)."""
    counts = [float(len(sub) * seqlen) if token_mask is None else float(token_mask.index_select(0, sub).sum())
              for sub in chunks]
    total = sum(counts) or 1.0  # no real token at all: every chunk's (masked) loss is 0 anyway
    return [c / total for c in counts]


def tune_block(block: nn.Module, layers: dict[str, Target], inputs: BlockInputs, q_hidden: torch.Tensor,
               targets: torch.Tensor, settings: SignRoundSettings,
               init: dict[str, LayerParams] | None = None) -> BlockResult:
    """Tune the planned ``layers`` (names relative to ``block``) and return the best-loss parameters."""
    params = init or {name: LayerParams.initial(block.get_submodule(name).weight, s) for name, s in layers.items()}
    if settings.iters == 0:
        return BlockResult({n: p.clone() for n, p in params.items()})
    for name, p in params.items():
        tune_scales = settings.enable_minmax_tuning and not isinstance(layers[name], GridWeight)
        p.v.requires_grad_(True)
        p.min_scale.requires_grad_(tune_scales)
        p.max_scale.requires_grad_(tune_scales)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    result = BlockResult({})
    sampler = BatchSampler(inputs.nsamples, settings.batch_size * settings.gradient_accumulate_steps, settings.seed)
    try:
        with wrapped(block, layers, params, settings.bf16) as wrappers:
            _loop(block, inputs, q_hidden, targets, settings, params, list(wrappers.values()), sampler, result)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for p in params.values():
            for t in (p.v, p.min_scale, p.max_scale):
                t.requires_grad_(False)
                t.grad = None
    return result


def _loop(block, inputs, q_hidden, targets, settings, params, wrappers, sampler, result: BlockResult) -> None:
    ordered = list(params.values())
    momentum = RoundingMomentum(settings.momentum)
    for i in range(settings.iters):
        loss = _batch_loss(block, inputs, q_hidden, targets, sampler.next(), settings, wrappers)
        result.losses.append(loss)
        if i == 0:
            result.first_loss = loss
        if i == 0 or loss < result.best_loss:
            result.best_loss, result.best_iter = loss, i
            result.params = {n: p.clone() for n, p in params.items()}
        decay = 1.0 - i / settings.iters
        _step(ordered, settings.round_lr * decay, settings.scale_lr * decay, settings.enable_minmax_tuning, momentum)
