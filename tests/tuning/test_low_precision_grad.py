"""The bf16-backward linear: exact forward, backward products close to float32 with the same signs, options."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_autoround import AutoRoundConfig
from hf_autoround.tuning.low_precision_grad import bf16_backward_linear, native_bf16
from hf_autoround.tuning.options import TuningOptions


def grads(fn, x, w, b):
    x, w = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = fn(x, w, b)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, w.grad


def test_forward_is_exact_and_gradients_are_bf16_close():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 40, 96, generator=gen), torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
    y, dx, dw = grads(bf16_backward_linear, x, w, b)
    y_ref, dx_ref, dw_ref = grads(F.linear, x, w, b)
    assert torch.equal(y, y_ref)  # the loss SignRound selects on is untouched
    assert dx.dtype == dw.dtype == torch.float32
    for got, want in ((dx, dx_ref), (dw, dw_ref)):
        rel = (got - want).abs().max() / want.abs().max()
        assert 0 < rel < 2e-2  # rounded (so the test sees the bf16 path), but only by bf16 precision
        big = want.abs() > 0.05 * want.abs().max()
        assert torch.equal(got.sign()[big], want.sign()[big])


def test_frozen_inputs_get_no_gradient_and_a_trainable_bias_gets_its_own():
    x, w = torch.randn(5, 32), torch.randn(8, 32, requires_grad=True)
    bf16_backward_linear(x, w, None).sum().backward()
    assert x.grad is None and w.grad is not None
    b = torch.randn(8, requires_grad=True)
    y = bf16_backward_linear(x.unsqueeze(0), w, b)
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(b.grad, torch.arange(8.0) * 5)  # summed over the 5 rows, exactly (no bf16 rounding)


def test_option_defaults_to_where_bf16_is_native():
    config = AutoRoundConfig(bits=4, group_size=32, iters=2)
    assert TuningOptions.from_config(config).signround.bf16_backward == native_bf16()
    assert TuningOptions.from_config(config, bf16_backward=False).signround.bf16_backward is False
    assert TuningOptions.from_config(config, bf16_backward=True).signround.bf16_backward is True
    with pytest.raises(ValueError, match="bf16_backward='yes'"):
        TuningOptions.from_config(config, bf16_backward="yes")
