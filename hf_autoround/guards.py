"""Numerical guards: no NaN or Inf ever reaches a saved checkpoint.

Before quantising, every planned layer's weight is checked for NaN/Inf and for a range whose scale would overflow
float16 (the stored scale dtype). NaN/Inf weights always stop the run (the source model is broken; keeping such a
layer float would save the NaN). For an overflowing range, ``on_nonfinite="raise"`` (default) stops with the layer
names and ``"keep_float"`` leaves those layers in float (recorded in the config like any float layer). After
quantising, a packed layer's scales are checked once more as a last line of defence.
"""
from __future__ import annotations

import logging

import torch

from .file_pages import page_out
from .qdq import SCALE_DTYPE

logger = logging.getLogger(__name__)
POLICIES = ("raise", "keep_float")
_FP16_MAX = torch.finfo(SCALE_DTYPE).max


class NonFiniteError(ValueError):
    pass


def nonfinite_count(weight: torch.Tensor) -> int:
    return int((~torch.isfinite(weight.detach())).sum())


def weight_problem(weight: torch.Tensor, scheme) -> str | None:
    """Why this (finite) weight cannot be quantised safely, or None."""
    w = weight.detach()
    span = float(w.abs().max()) / 2 ** (scheme.bits - 1) if scheme.sym else \
        float(w.max().clamp(min=0) - w.min().clamp(max=0)) / scheme.maxq
    if span > _FP16_MAX:
        return f"weights up to {float(w.abs().max()):.3g} overflow the float16 scale"
    return None


def apply_nonfinite_policy(model, plan, policy: str = "raise", weights=None) -> None:
    """Check every planned layer; raise, or move offenders to ``plan.kept_float``, per ``policy``.
    ``weights``: an iterable of (layer name, weight) over the planned layers, for models whose weights are not all
    in memory (read one at a time); None reads ``model.get_submodule(name).weight``."""
    if policy not in POLICIES:
        raise ValueError(f"on_nonfinite={policy!r} is invalid; expected one of {POLICIES}")
    if weights is None:
        weights = ((n, model.get_submodule(n).weight) for n in plan.quantized)
    broken, problems = {}, {}
    for name, weight in weights:
        count = nonfinite_count(weight)
        if count:
            broken[name] = count
        elif not broken:
            reason = weight_problem(weight, plan.quantized[name])
            if reason:
                problems[name] = reason
        page_out(weight)  # a weight mapped from its file need not stay resident until its block is tuned
    if broken:
        raise NonFiniteError("the model has NaN/Inf weights, which no checkpoint should carry: " +
                             "; ".join(f"{n}: {c} values" for n, c in broken.items()))
    if not problems:
        return
    listing = "; ".join(f"{n}: {r}" for n, r in problems.items())
    if policy == "raise":
        raise NonFiniteError(f"cannot quantise {len(problems)} layer(s): {listing}. Fix the weights, or pass "
                             f"on_nonfinite='keep_float' to leave them in float")
    for name, reason in problems.items():
        del plan.quantized[name]
        plan.kept_float[name] = reason
        logger.warning("keeping %s in float: %s", name, reason)


def check_packed(name: str, qw) -> None:
    """Last line of defence before a layer is packed: finite, non-zero scales."""
    scales = qw.scales.float()
    if not torch.isfinite(scales).all() or (scales == 0).any():
        raise NonFiniteError(f"{name}: quantisation produced non-finite or zero scales; keep it float with "
                             f"extra_config={{{name!r}: {{'bits': 16}}}}")
