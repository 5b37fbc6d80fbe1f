"""Activation-aware channel scaling, folded into the float tensors before a block's linears (run before SignRound).

For a linear ``y = x W^T`` and any positive per-input-channel vector ``s``, ``y = (x / s)(W diag(s))^T``. Where the
module that produces ``x`` is linear in its output channels (an RMSNorm's weight, the rows of a linear), ``1 / s``
folds into it exactly, so the float model is unchanged while the weight that gets quantised becomes
``W diag(s)``: channels that carry large activations get more of each group's grid. This is AWQ's idea. The
scale is searched per site (a source and the linears reading it) on ``s = rms(x)^alpha`` (normalised so that
``max(s) min(s) = 1``), ``alpha`` on a grid from 0 (no scaling) to 1, minimising the output error of plain RTN
summed over the site's linears on the block's calibration inputs:

    || X W^T - (X / s) Q(W diag(s))^T ||^2 = sum_i d_i^T H d_i,   D = Q(W diag(s)) diag(1/s) - W,  H = X^T X

so one ``in x in`` Gram matrix per site, accumulated while the block's float targets are computed, scores every
candidate without touching the tokens again. ``alpha = 0`` is a candidate, so a site is never made worse by
that measure. Sites are declared in ``SITES`` (Llama-family names) and each one found is proven on the block
itself before it is used (``exact_sites``): a random scale folded in must leave the block's output on a calibration
sample unchanged. So a source whose output does not scale with its weight (Gemma's ``1 + weight`` norm), a norm
that also feeds other layers (a parallel attention/MLP block), an MLP with a nonlinearity after ``up_proj``, or a
``v_proj`` whose outputs are not ``o_proj``'s inputs (GQA) is left alone.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..file_pages import page_out
from ..qdq import qdq
from .input_hooks import InputHooks

logger = logging.getLogger(__name__)

ALPHAS = tuple(i / 20 for i in range(1, 21))  # the candidates besides alpha = 0 (no scaling)


@dataclass(frozen=True)
class ScaleSite:
    """``source``: the module whose output ``consumers`` read (names relative to a block)."""

    source: str
    consumers: tuple[str, ...]


SITES = (
    ScaleSite("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ScaleSite("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ScaleSite("mlp.up_proj", ("mlp.down_proj",)),  # gated MLP: down_proj reads act(gate_proj(x)) * up_proj(x)
    ScaleSite("self_attn.v_proj", ("self_attn.o_proj",)),  # o_proj reads the heads' values (not under GQA)
)


def find_sites(block: nn.Module, layers) -> list[ScaleSite]:
    """The sites of ``block`` by name: every consumer planned (names relative to ``block``, prefixed for a group of
    blocks, e.g. ``0.input_layernorm``) and a source with a weight of the consumers' input width."""
    prefixes = {name[:-len(c)] for name in layers for s in SITES for c in s.consumers if name.endswith(c)}
    found = []
    for prefix in sorted(prefixes):
        for site in SITES:
            consumers = tuple(prefix + c for c in site.consumers)
            if not all(c in layers for c in consumers):
                continue
            source = _submodule(block, prefix + site.source)
            if source is not None and _width(source) == block.get_submodule(consumers[0]).in_features:
                found.append(ScaleSite(prefix + site.source, consumers))
    return found


def _submodule(block: nn.Module, name: str) -> nn.Module | None:
    try:
        return block.get_submodule(name)
    except AttributeError:
        return None


def _width(source: nn.Module) -> int | None:
    """Output channels a scale would fold into: a linear's rows, or a norm's (1-D) weight."""
    if isinstance(source, nn.Linear):
        return source.out_features
    weight = getattr(source, "weight", None)
    return weight.shape[0] if isinstance(weight, torch.Tensor) and weight.dim() == 1 else None


@torch.no_grad()
def exact_sites(block: nn.Module, sites: list[ScaleSite], run, tolerance: float = 1e-4) -> list[ScaleSite]:
    """The sites where folding a random scale leaves ``run()`` (the block's output on a sample) unchanged, to a
    relative ``tolerance``; the block is restored after each trial."""
    reference = run().float()
    kept = []
    for site in sites:
        tensors = _site_tensors(block, site)
        saved = [t.data for t in tensors]
        width = block.get_submodule(site.consumers[0]).in_features
        trial = torch.empty(width).uniform_(-0.7, 0.7, generator=torch.Generator().manual_seed(0)).exp()
        try:
            fold_scale(block, site, trial, release=False)
            err = (run().float() - reference).norm() / reference.norm().clamp(min=1e-30)
        finally:
            for t, data in zip(tensors, saved):
                t.data = data
        if err <= tolerance:
            kept.append(site)
        else:
            logger.debug("channel scaling: %s does not fold exactly (relative change %.3g); left alone",
                         site.source, float(err))
    return kept


def _site_tensors(block: nn.Module, site: ScaleSite) -> list[torch.Tensor]:
    source = block.get_submodule(site.source)
    tensors = [source.weight] + ([source.bias] if isinstance(getattr(source, "bias", None), torch.Tensor) else [])
    return tensors + [block.get_submodule(n).weight for n in site.consumers]


class InputGram(InputHooks):
    """``X^T X`` (float32) of the inputs of each site's first consumer, over every token seen. Float32 on purpose:
    with bf16 products here and in ``output_error`` (and for the outputs the driver hands on), the 4-block gap was
    worse at every seed (``benchmarks/results/tuning_w4g128_blocks4_3seeds_bf16stats.txt``). A likely cause: the
    errors compared are quadratic forms on this ill-conditioned matrix, and bf16's rounding of its entries can
    exceed the differences between candidates."""

    def __init__(self, block: nn.Module, sites: list[ScaleSite]):
        super().__init__(block, [s.consumers[0] for s in sites])
        self.grams: dict[str, torch.Tensor] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        gram = x.t() @ x
        self.grams[name] = gram if name not in self.grams else self.grams[name].add_(gram)


def output_error(weights, schemes, gram: torch.Tensor, s: torch.Tensor) -> float:
    """``sum over consumers of ||X W^T - (X/s) Q(W diag(s))^T||^2`` from ``gram = X^T X``."""
    total = 0.0
    for w, scheme in zip(weights, schemes):
        d = qdq(w * s, scheme) / s - w
        total += float(((d @ gram) * d).sum())
    return total


def candidate_scales(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``rms(x)^alpha`` per channel, normalised so that ``max * min = 1``."""
    rms = gram.diagonal().clamp(min=0).sqrt()
    rms = rms.clamp(min=rms.max() * 1e-4 + 1e-12)
    s = rms.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_site(weights, schemes, gram: torch.Tensor) -> tuple[torch.Tensor, float, float, float]:
    """(scale ``[in]``, its alpha, its error, the error unscaled) for the linears ``weights`` reading one input."""
    weights = [w.detach().float() for w in weights]
    ones = torch.ones(gram.shape[0])
    unscaled = output_error(weights, schemes, gram, ones)
    best = (ones, 0.0, unscaled)
    for alpha in ALPHAS:
        s = candidate_scales(gram, alpha)
        err = output_error(weights, schemes, gram, s)
        if err < best[2]:
            best = (s, alpha, err)
    return (*best, unscaled)


@torch.no_grad()
def fold_scale(block: nn.Module, site: ScaleSite, s: torch.Tensor, release: bool = True) -> None:
    """Divide the source's output channels by ``s`` and multiply the consumers' input columns by it, as new
    tensors under the same parameters (never written into a weight that maps its checkpoint file); ``release``:
    hand the replaced tensors' file pages back (they are read no more, ``file_pages``)."""
    source = block.get_submodule(site.source)
    inv = 1.0 / s
    factors = [inv.unsqueeze(1) if isinstance(source, nn.Linear) else inv]
    if isinstance(getattr(source, "bias", None), torch.Tensor):
        factors.append(inv)
    factors += [s.unsqueeze(0)] * len(site.consumers)
    for tensor, factor in zip(_site_tensors(block, site), factors):
        old = tensor.data
        tensor.data = old * factor.to(old.dtype)
        if release:
            page_out(old)


def scale_block(block: nn.Module, layers: dict, sites: list[ScaleSite], grams: dict[str, torch.Tensor],
                act_sums: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Search and fold each site's scale; returns site source -> alpha chosen (0: left alone). ``act_sums``
    (per-channel ``sum x^2`` of the consumers, for the optimised-RTN search that follows) are divided by ``s^2``
    to match the scaled inputs."""
    choices = {}
    for site in sites:
        gram = grams[site.consumers[0]]
        weights = [block.get_submodule(n).weight for n in site.consumers]
        s, alpha, _, _ = search_site(weights, [layers[n] for n in site.consumers], gram)
        choices[site.source] = alpha
        if alpha == 0:
            continue
        fold_scale(block, site, s)
        for name in site.consumers:
            if act_sums is not None and name in act_sums:
                act_sums[name] = act_sums[name] / (s * s)
    return choices
