"""Perplexity of a causal LM on a text: non-overlapping windows of ``seqlen`` tokens, mean token NLL, exp."""
from __future__ import annotations

import math
import os

import torch
from tqdm.auto import tqdm

BUNDLED_TEXT = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "eval_text.txt")


def read_text(path: str | None = None) -> str:
    with open(path or BUNDLED_TEXT, encoding="utf-8") as f:
        return f.read()


def token_ids(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:max_tokens] if max_tokens else ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, batch_size: int = 1, progress: bool = False) -> float:
    """Perplexity over ``ids`` (1-D) split into full windows of ``seqlen`` (a shorter tail is dropped)."""
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"need at least seqlen={seqlen} tokens for perplexity, got {ids.numel()}")
    windows = ids[: n_windows * seqlen].view(n_windows, seqlen)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, n_windows, batch_size), desc="perplexity", disable=not progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)
