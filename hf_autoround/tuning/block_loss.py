"""The loss between a block's outputs with fake-quantised weights and its float targets, over real tokens.

Two kinds (``SignRoundSettings.loss``):

- ``"mse"``: the mean squared error over every real token and hidden unit (the reference AutoRound's loss).
- ``"relative"``: each token's mean squared error divided by the mean square of its float target, averaged over
  real tokens.

Why ``relative``: a block's output is the residual stream, and every later reader of it (each block's RMSNorm,
the final norm) divides a token by its own RMS. An error on a token therefore matters in proportion to that token's
size, not in absolute terms. In SmolLM2-135M the first token of each sample carries massive activations: with W4G128
RTN, it holds 48-97 % of the plain squared error at the outputs of blocks 11-27, while being 0.4 % of the tokens
(``benchmarks/token_error.py``). The plain MSE spends the tuning of those blocks on that token, whose scale the next
norm removes anyway.
"""
from __future__ import annotations

import torch

LOSSES = ("relative", "mse")
_TINY = 1e-12  # floor of a target's mean square (an all-zero target token)


def block_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, kind: str = "mse") -> torch.Tensor:
    """Loss of ``pred`` against ``target`` (``[b, seq, hidden]``) over the real tokens of ``mask`` (``[b, seq]``,
    1 = real; None = all), computed in float32."""
    diff = pred.float() - target.float()
    if kind == "mse":
        return _plain_mse(diff, mask)
    if kind == "relative":
        per_token = diff.pow(2).mean(-1) / target.float().pow(2).mean(-1).clamp(min=_TINY)
        return _token_mean(per_token, mask)
    raise ValueError(f"loss={kind!r}: expected one of {LOSSES}")


def _plain_mse(diff: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return diff.pow(2).mean()
    m = mask.to(diff.dtype).unsqueeze(-1)
    return (diff.pow(2) * m).sum() / (m.sum() * diff.shape[-1]).clamp(min=1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1)


def chunked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None, samples: int = 8) -> float:
    """``block_loss(pred, target, mask, "mse")`` summed over ``samples`` samples at a time, so that no temporary is as
    big as the outputs (the whole-set error of a block's outputs: two such temporaries would be the run's peak)."""
    total = count = 0.0
    for start in range(0, pred.shape[0], samples):
        sq = (pred[start:start + samples].float() - target[start:start + samples].float()).pow(2)
        if mask is None:
            total, count = total + float(sq.sum(dtype=torch.float64)), count + sq.numel()
            continue
        m = mask[start:start + samples].to(sq.dtype).unsqueeze(-1)
        total += float((sq * m).sum(dtype=torch.float64))
        count += float(m.sum(dtype=torch.float64)) * sq.shape[-1]
    return total / max(count, 1.0)
