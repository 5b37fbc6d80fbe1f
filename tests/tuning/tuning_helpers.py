"""Helpers for the tuning tests (imported by each module; not a conftest, so that `from conftest import ...`
keeps meaning tests/conftest.py): one thread (tiny tensors; avoids OpenMP spinning on a shared CPU), a
character-level tokenizer."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def calib(n: int = 8, seq: int = 24, seed: int = 3) -> list[torch.Tensor]:
    """``n`` random token-id samples of ``seq`` tokens (ids 1..255), the same for a given seed."""
    torch.manual_seed(seed)
    return [torch.randint(1, 256, (seq,)) for _ in range(n)]


class CharTokenizer:
    """Bytes as token ids (0..255); enough of the tokenizer interface for calibration data."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def apply_chat_template(self, messages, tokenize=False, **kwargs):
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()
