"""The bf16 linears: exact or bf16-close forward, backward products close to float32 with the same signs; which
linear each tuned layer gets; the options; "auto" follows the timed speed, not the CPU flag."""
from __future__ import annotations

import time
import types

import pytest
import torch
import torch.nn.functional as F

from hf_autoround import AutoRoundConfig
from hf_autoround.tuning import bf16_matmul as bm
from hf_autoround.tuning.bf16_matmul import (MatmulPrecision, bf16_backward_linear, bf16_linear, bf16_speed,
                                              scores_attention)
from hf_autoround.tuning import options as options_module
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


def test_bf16_forward_is_close_and_its_gradients_are_the_bf16_products_of_the_rounded_inputs():
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 40, 96, generator=gen), torch.randn(64, 96, generator=gen), torch.randn(64, generator=gen)
    y, dx, dw = grads(bf16_linear, x, w, b)
    y_ref, dx_ref, dw_ref = grads(F.linear, x, w, b)
    assert y.dtype == dx.dtype == dw.dtype == torch.float32
    rel = (y - y_ref).abs().max() / y_ref.abs().max()
    assert 0 < rel < 1e-2
    assert torch.equal(y, F.linear(x.bfloat16(), w.bfloat16()).float() + b)  # bf16 product, float32 bias
    _, dx_bwd, dw_bwd = grads(bf16_backward_linear, x, w, b)
    assert torch.equal(dx, dx_bwd) and torch.equal(dw, dw_bwd)  # the same bf16 copies feed the backward


@pytest.mark.parametrize("fn", [bf16_backward_linear, bf16_linear])
def test_frozen_inputs_get_no_gradient_and_a_trainable_bias_gets_its_own(fn):
    x, w = torch.randn(5, 32), torch.randn(8, 32, requires_grad=True)
    fn(x, w, None).sum().backward()
    assert x.grad is None and w.grad is not None
    b = torch.randn(8, requires_grad=True)
    y = fn(x.unsqueeze(0), w, b)
    (y * torch.arange(8.0)).sum().backward()
    assert torch.equal(b.grad, torch.arange(8.0) * 5)  # summed over the 5 rows, exactly (no bf16 rounding)


def test_each_layer_gets_its_linear():
    both, backward, none = MatmulPrecision(True, True), MatmulPrecision(False, True), MatmulPrecision()
    assert both.matmul("mlp.down_proj") is bf16_linear
    assert both.matmul("self_attn.v_proj") is bf16_linear
    for scores in ("self_attn.q_proj", "0.self_attn.k_proj", "self_attn.qkv_proj", "attn.c_attn"):
        assert scores_attention(scores)
        assert both.matmul(scores) is bf16_backward_linear  # attention logits keep a float32 forward
    assert MatmulPrecision(True, False).matmul("self_attn.q_proj") is F.linear
    assert backward.matmul("mlp.down_proj") is bf16_backward_linear
    assert none.matmul("mlp.down_proj") is F.linear
    assert not scores_attention("self_attn.o_proj")


@pytest.mark.parametrize("name", ["bf16_forward", "bf16_backward"])
def test_options_default_to_where_bf16_timed_faster(name):
    config = AutoRoundConfig(bits=4, group_size=32, iters=2)
    field = name.split("_")[1]
    assert getattr(TuningOptions.from_config(config).signround.bf16, field) == bf16_speed().faster
    assert getattr(TuningOptions.from_config(config, **{name: False}).signround.bf16, field) is False
    assert getattr(TuningOptions.from_config(config, **{name: True}).signround.bf16, field) is True
    with pytest.raises(ValueError, match=f"{name}='yes'"):
        TuningOptions.from_config(config, **{name: "yes"})


def test_iters_zero_runs_no_probe(monkeypatch):
    """RTN and optimised RTN (iters 0) run no tuned product, so "auto" must not spend the probe's time on them."""
    def no_probe():
        raise AssertionError("bf16_speed called at iters 0")

    monkeypatch.setattr(options_module, "bf16_speed", no_probe)
    config = AutoRoundConfig(bits=4, group_size=32, iters=0)
    assert TuningOptions.from_config(config).signround.bf16 == MatmulPrecision()
    with pytest.raises(ValueError, match="bf16_forward='yes'"):
        TuningOptions.from_config(config, bf16_forward="yes")


@pytest.fixture
def timed(monkeypatch):
    """``bf16_speed`` with the product timings (seconds by dtype) and the native flag given by the test."""
    def setup(native: bool, seconds: dict):
        monkeypatch.setattr(bm, "native_bf16", lambda: native)
        monkeypatch.setattr(bm, "linear_cpu_seconds", lambda x, w: seconds[x.dtype])
        bm.bf16_speed.cache_clear()
        return bm.bf16_speed()

    yield setup
    bm.bf16_speed.cache_clear()


def test_bf16_chosen_only_where_it_times_faster(timed):
    fast = timed(True, {torch.float32: 2.3, torch.bfloat16: 1.0})
    assert fast.faster and fast.ratio == pytest.approx(2.3) and "2.30x" in fast.describe()
    slow = timed(True, {torch.float32: 0.6, torch.bfloat16: 1.0})  # flag present, product slower (seen here)
    assert not slow.faster and "0.60x" in slow.describe()
    assert not timed(True, {torch.float32: 1.1, torch.bfloat16: 1.0}).faster  # under MIN_SPEEDUP
    config = AutoRoundConfig(bits=4, group_size=32, iters=2)
    assert TuningOptions.from_config(config).signround.bf16 == MatmulPrecision(False, False)


def test_a_burst_of_load_does_not_flip_the_choice(monkeypatch):
    """Something slows the first 7 timings 8x (CPU time leaves out waiting descheduled, but not, say, a shared
    cache thrashed by another process). Float32 products take 0.6 of a bf16 one. Interleaved rounds see the burst
    on both sides of most rounds, and the median drops the one round it splits; timing 7 float32 runs first, then
    the bf16 ones, would have read 4.8x and chosen bf16."""
    calls = []

    def linear_cpu_seconds(x, w):
        calls.append(x.dtype)
        return (8.0 if len(calls) <= 7 else 1.0) * (0.6 if x.dtype == torch.float32 else 1.0)

    monkeypatch.setattr(bm, "native_bf16", lambda: True)
    monkeypatch.setattr(bm, "probe_operands", lambda dtype: (torch.zeros(2, 2, dtype=dtype),) * 2)
    monkeypatch.setattr(bm, "linear_cpu_seconds", linear_cpu_seconds)
    bm.bf16_speed.cache_clear()
    try:
        speed = bm.bf16_speed()
    finally:
        bm.bf16_speed.cache_clear()
    assert len(calls) == 2 * bm.PROBE_ROUNDS
    assert speed.ratio == pytest.approx(0.6) and not speed.faster


def test_the_probe_runs_on_one_thread_and_restores_the_count(monkeypatch):
    threads_seen = []

    def linear_cpu_seconds(x, w):
        threads_seen.append(torch.get_num_threads())
        return 1.0

    monkeypatch.setattr(bm, "native_bf16", lambda: True)
    monkeypatch.setattr(bm, "probe_operands", lambda dtype: (torch.zeros(2, 2, dtype=dtype),) * 2)
    monkeypatch.setattr(bm, "linear_cpu_seconds", linear_cpu_seconds)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    bm.bf16_speed.cache_clear()
    try:
        bm.bf16_speed()
        assert threads_seen == [1] * (2 * bm.PROBE_ROUNDS) and torch.get_num_threads() == 2
    finally:
        bm.bf16_speed.cache_clear()
        torch.set_num_threads(before)


def test_the_probe_clock_leaves_out_time_spent_waiting(monkeypatch):
    """A product that waits (here: sleeps, as a descheduled thread would) for 0.2 s: its wall time counts the
    wait, the probe's CPU time does not."""
    def waiting_linear(x, w):
        time.sleep(0.2)
        return x

    monkeypatch.setattr(bm, "F", types.SimpleNamespace(linear=waiting_linear))
    x = torch.zeros(2, 2)
    assert bm.linear_seconds(x, x) >= 0.2
    assert bm.linear_cpu_seconds(x, x) < 0.05


def test_no_native_bf16_is_not_timed(timed):
    speed = timed(False, {})  # a timing would raise KeyError
    assert speed == bm.Bf16Speed() and not speed.faster
    assert "no native bf16" in speed.describe()


def test_the_probe_summarises_its_runs(monkeypatch):
    def clock():  # perf_counter readings around three calls that take 1 s, 3 s and 2 s
        ticks = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0])
        return types.SimpleNamespace(perf_counter=lambda: next(ticks))

    monkeypatch.setattr(bm, "time", clock())
    assert bm.product_seconds(torch.float32, (4, 8, 4), warmup=0, runs=3) == 1.0
    monkeypatch.setattr(bm, "time", clock())
    assert bm.product_seconds(torch.float32, (4, 8, 4), warmup=0, runs=3, summary=max) == 3.0
