"""The compiled block step: the same loss and gradients as the eager one, tuning through it keeps its guarantees,
and a failed compile falls back to eager with a warning."""
from __future__ import annotations

import logging
import shutil

import pytest
import torch
from test_signround import block_setup, loss_with
from tuning_helpers import one_thread  # noqa: F401  (autouse)

from hf_autoround.config import AutoRoundConfig
from hf_autoround.tuning import compiled_step
from hf_autoround.tuning.compiled_step import CompiledLoss, compiled_loss, eager_loss, step_loss
from hf_autoround.tuning.options import TuningOptions
from hf_autoround.tuning.signround import LayerParams, SignRoundSettings, tune_block, wrapped

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="torch.compile on the CPU needs a C++ compiler")


def loss_and_grads(loss_of, block, layers, inputs, targets):
    """(loss, V gradients by layer) of one step on every sample, at the RTN start."""
    params = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    for p in params.values():
        p.v.requires_grad_(True)
    for p in block.parameters():
        p.requires_grad_(False)
    with wrapped(block, layers, params):
        loss = loss_of(block, inputs.hidden, inputs.extra_args, inputs.kwargs_for(torch.arange(inputs.nsamples)),
                       targets, None, "relative")
        loss.backward()
    return loss.item(), {n: p.v.grad for n, p in params.items()}


@needs_compiler
def test_compiled_step_matches_the_eager_step():
    block, inputs, targets, layers = block_setup()
    eager, eager_grads = loss_and_grads(eager_loss, block, layers, inputs, targets)
    step = compiled_loss()
    compiled, compiled_grads = loss_and_grads(step, block, layers, inputs, targets)
    assert step.failure is None and step.compiled_once
    assert compiled == pytest.approx(eager, rel=1e-5)
    for name in layers:
        assert torch.allclose(compiled_grads[name], eager_grads[name], rtol=1e-3, atol=1e-7), name


@needs_compiler
def test_tuning_through_the_compiled_step_keeps_the_best_loss_and_repeats():
    block, inputs, targets, layers = block_setup(n=8)
    settings = SignRoundSettings(iters=30, batch_size=8, compile=True)
    first = tune_block(block, layers, inputs, inputs.hidden, targets, settings)
    again = tune_block(block, layers, inputs, inputs.hidden, targets, settings)
    assert compiled_loss().failure is None
    assert first.losses == again.losses  # reproducible run to run
    everything = torch.arange(8)
    kept = loss_with(block, layers, first.params, inputs, targets, everything)  # scored eagerly
    assert kept == pytest.approx(first.best_loss, rel=1e-5)
    rtn = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    assert kept < 0.9 * loss_with(block, layers, rtn, inputs, targets, everything)


def test_a_failed_compile_falls_back_to_eager_once(monkeypatch, caplog):
    block, inputs, targets, layers = block_setup(n=4)
    step = CompiledLoss()
    calls = []

    def broken(*args):
        calls.append(1)
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(step, "fn", broken)
    with caplog.at_level(logging.WARNING, logger=compiled_step.__name__):
        loss, _ = loss_and_grads(step, block, layers, inputs, targets)
        again, _ = loss_and_grads(step, block, layers, inputs, targets)
    eager, _ = loss_and_grads(eager_loss, block, layers, inputs, targets)
    assert loss == again == eager
    assert len(calls) == 1  # not retried
    assert step.failure == "RuntimeError: no C++ compiler found"
    assert "tuning continues eagerly" in caplog.text and "no C++ compiler found" in caplog.text


def test_step_loss_is_eager_unless_asked():
    assert step_loss(False) is eager_loss
    assert isinstance(step_loss(True), CompiledLoss) and step_loss(True) is compiled_loss()


def test_the_enable_torch_compile_option_reaches_the_settings():
    config = AutoRoundConfig(bits=4, iters=2)
    assert TuningOptions.from_config(config, enable_torch_compile=True).signround.compile is True
    assert TuningOptions.from_config(config).signround.compile is False
    assert "enable_torch_compile" not in TuningOptions.from_config(config).ignored
    with pytest.raises(ValueError, match="enable_torch_compile='yes': expected True or False"):
        TuningOptions.from_config(config, enable_torch_compile="yes")


@needs_compiler
def test_a_chunked_step_compiles_and_matches_the_eager_chunked_step():
    """With more than one chunk the wrappers read the step's shared weights (``StepWeights``) inside the graph."""
    block, inputs, targets, layers = block_setup(n=8)
    seq = inputs.hidden.shape[1]
    runs = {compile: tune_block(block, layers, inputs, inputs.hidden, targets,
                                SignRoundSettings(iters=3, batch_size=8, chunk_tokens=4 * seq, compile=compile))
            for compile in (False, True)}
    assert compiled_loss().failure is None
    assert runs[True].losses == pytest.approx(runs[False].losses, rel=1e-4)
