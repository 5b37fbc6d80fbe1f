"""The per-block loop: best-loss parameters kept, bounds held, loss lowered, signed steps with linear decay."""
from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model
from tuning_helpers import one_thread  # noqa: F401  (autouse)

from hf_autoround.config import AutoRoundConfig
from hf_autoround.scheme import QuantScheme
from hf_autoround.tuning.cache import capture_block_inputs, forward_block, run_block
from hf_autoround.tuning.data import CalibrationData
from hf_autoround.tuning.bf16_matmul import MatmulPrecision
from hf_autoround.tuning.block_loss import block_loss
from hf_autoround.tuning.options import TuningOptions
from hf_autoround.tuning.signround import (BatchSampler, LayerParams, QdqLinear, RoundingMomentum, SignRoundSettings,
                                           _batch_loss, _step, tune_block, wrapped)

SCHEME = QuantScheme(2, 32, False)  # 2-bit: large rounding errors, so tuning has something to win
# float32; bf16 backward products; bf16 forward and backward products (q/k forward float32)
PRECISIONS = [MatmulPrecision(), MatmulPrecision(backward=True), MatmulPrecision(forward=True, backward=True)]


def block_setup(arch="llama", n=8, seq=24, pads=None):
    """Block 0 of a tiny model, its captured inputs, float targets and planned layers; ``pads``: right padding
    (in tokens) per sample, for a padding mask."""
    model = build_tiny_model(arch)
    torch.manual_seed(5)
    mask = None
    if pads is not None:
        mask = torch.ones(n, seq, dtype=torch.long)
        for i, pad in enumerate(pads):
            mask[i, seq - pad:] = 0
    data = CalibrationData(torch.randint(0, 256, (n, seq)), mask)
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks[0], data)
    block = blocks[0]
    targets = run_block(block, inputs, inputs.hidden, 8, torch.float32)
    layers = {n: SCHEME for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return block, inputs, targets, layers


def loss_with(block, layers, params, inputs, targets, idx, kind=SignRoundSettings.loss, bf16=MatmulPrecision()):
    with wrapped(block, layers, params, bf16), torch.no_grad():
        pred = forward_block(block, inputs, inputs.hidden, idx, torch.float32)
    return block_loss(pred, targets.index_select(0, idx), None, kind).item()


@pytest.mark.parametrize("bf16", PRECISIONS)
def test_kept_parameters_have_the_best_loss(bf16):
    block, inputs, targets, layers = block_setup(n=4)
    # one batch = every sample: each step sees the same data, and the kept parameters give the loss recorded
    settings = SignRoundSettings(iters=25, batch_size=4, bf16=bf16)
    result = tune_block(block, layers, inputs, inputs.hidden, targets, settings)
    assert result.best_loss == min(result.losses)
    assert result.losses[result.best_iter] == result.best_loss
    kept = loss_with(block, layers, result.params, inputs, targets, torch.arange(4), bf16=bf16)
    assert abs(kept - result.best_loss) <= 1e-6 * result.best_loss


@pytest.mark.parametrize("bf16, kind", [(p, "relative") for p in PRECISIONS] + [(PRECISIONS[0], "mse")])
def test_tuning_lowers_the_block_loss_against_rtn(bf16, kind):
    block, inputs, targets, layers = block_setup()
    result = tune_block(block, layers, inputs, inputs.hidden, targets,
                        SignRoundSettings(iters=60, batch_size=8, bf16=bf16, loss=kind))
    rtn = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    everything = torch.arange(inputs.nsamples)
    # step 0 runs with the RTN parameters on the whole (single) batch
    assert result.first_loss == loss_with(block, layers, rtn, inputs, targets, everything, kind, bf16)
    rtn_loss = loss_with(block, layers, rtn, inputs, targets, everything, kind)  # exact products from here on
    assert loss_with(block, layers, result.params, inputs, targets, everything, kind) < 0.9 * rtn_loss


def test_bounds_hold_with_a_huge_learning_rate():
    block, inputs, targets, layers = block_setup(n=4)
    live = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    result = tune_block(block, layers, inputs, inputs.hidden, targets,
                        SignRoundSettings(iters=6, lr=0.4, minmax_lr=0.7, batch_size=4), init=live)
    for params in (list(live.values()), list(result.params.values())):  # the last state and the kept one
        assert max(p.v.abs().max().item() for p in params) <= 0.5
        assert all(0 <= p.min_scale.min() and p.max_scale.max() <= 1 for p in params)
        assert all(not p.v.requires_grad for p in params)
    assert any(p.v.abs().max().item() == 0.5 for p in live.values())  # the clamp was actually needed
    assert all(p.requires_grad for p in block.parameters())  # the block's own parameters are restored


def test_block_parameters_are_left_untouched():
    block, inputs, targets, layers = block_setup(n=4)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    tune_block(block, layers, inputs, inputs.hidden, targets, SignRoundSettings(iters=3, batch_size=4))
    after = block.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_iters_zero_returns_the_rtn_parameters():
    block, inputs, targets, layers = block_setup(n=4)
    result = tune_block(block, layers, inputs, inputs.hidden, targets, SignRoundSettings(iters=0))
    for name in layers:
        p = result.params[name]
        assert not p.v.any() and bool((p.min_scale == 1).all()) and bool((p.max_scale == 1).all())


def test_signed_step_with_linear_decay():
    p = LayerParams(torch.zeros(2, 1, 4), torch.ones(2, 1), torch.ones(2, 1))
    p.v.grad = torch.tensor([[[1.0, -2.0, 0.0, 3e-9]], [[-1e-9, 5.0, -5.0, 0.0]]])
    p.min_scale.grad = torch.tensor([[1.0], [-1.0]])
    p.max_scale.grad = torch.tensor([[-1.0], [1.0]])
    _step([p], lr=0.1, scale_lr=0.2, tune_scales=True, momentum=RoundingMomentum(0.0))
    assert torch.allclose(p.v, torch.tensor([[[-0.1, 0.1, 0.0, -0.1]], [[0.1, -0.1, 0.1, 0.0]]]))
    assert torch.allclose(p.min_scale, torch.tensor([[0.8], [1.0]]))  # 1.2 clamped to 1
    assert p.v.grad is None


def test_rounding_momentum_steps_along_the_sign_of_the_running_average():
    p = LayerParams(torch.zeros(1, 1, 3), torch.ones(1, 1), torch.ones(1, 1))
    momentum = RoundingMomentum(0.5)
    for grad in ([1.0, 1.0, -1.0], [-3.0, -0.5, 2.0]):
        p.v.grad = torch.tensor([[grad]])
        p.min_scale.grad, p.max_scale.grad = torch.tensor([[1.0]]), torch.tensor([[-1.0]])
        _step([p], lr=0.1, scale_lr=0.1, tune_scales=True, momentum=momentum)
    # first step: sign(g1) = (+, +, -); second: m = 0.5 g1 + 0.5 g2 = (-1, 0.25, 0.5), not sign(g2) = (-, -, +)
    assert torch.allclose(p.v, torch.tensor([[[-0.1 + 0.1, -0.1 - 0.1, 0.1 - 0.1]]]))
    assert torch.allclose(momentum.buffers[0], torch.tensor([[[-1.0, 0.25, 0.5]]]))
    assert torch.allclose(p.min_scale, torch.tensor([[0.8]]))  # the scales follow their own gradient's sign
    plain = RoundingMomentum(0.0)
    grads = [torch.tensor([2.0, -1.0])]
    assert plain.directions(grads) is grads and plain.buffers is None


@pytest.mark.parametrize("beta", [-0.1, 1.0, "0.5", True])
def test_momentum_outside_zero_to_one_is_refused(beta):
    with pytest.raises(ValueError, match="momentum=.*expected a number in \\[0, 1\\)"):
        SignRoundSettings(momentum=beta)


def test_momentum_changes_the_path_and_zero_is_the_plain_signed_step():
    block, inputs, targets, layers = block_setup(n=8)
    runs = {beta: tune_block(block, layers, inputs, inputs.hidden, targets,
                             SignRoundSettings(iters=6, batch_size=4, momentum=beta)) for beta in (0.0, 0.5)}
    assert runs[0.0].losses[:2] == runs[0.5].losses[:2]  # the first step is sign(grad) either way
    assert runs[0.0].losses[2:] != runs[0.5].losses[2:]


def test_batch_sampler_covers_every_sample_per_epoch():
    sampler = BatchSampler(10, 4, seed=1)
    seen = torch.cat([sampler.next(), sampler.next()])
    assert len(set(seen.tolist())) == 8
    batch = sampler.next()  # 2 left < 4: reshuffled
    assert batch.tolist() == sorted(batch.tolist()) and len(batch) == 4
    again = BatchSampler(10, 4, seed=1)
    assert torch.equal(again.next(), seen[:4])


def test_gradient_accumulation_matches_one_big_batch_direction():
    block, inputs, targets, layers = block_setup(n=8)
    one = tune_block(block, layers, inputs, inputs.hidden, targets, SignRoundSettings(iters=4, batch_size=8))
    acc = tune_block(block, layers, inputs, inputs.hidden, targets,
                     SignRoundSettings(iters=4, batch_size=4, gradient_accumulate_steps=2))
    assert abs(one.losses[0] - acc.losses[0]) <= 1e-5 * one.losses[0]


def test_the_momentum_option_reaches_the_settings():
    config = AutoRoundConfig(bits=4, group_size=32, iters=2)
    assert TuningOptions.from_config(config).signround.momentum == 0.0  # the reference's plain signed step
    assert TuningOptions.from_config(config, momentum=0.5).signround.momentum == 0.5
    with pytest.raises(ValueError, match="momentum=2"):
        TuningOptions.from_config(config, momentum=2)


def test_chunk_samples_bound_the_tokens_of_a_forward():
    assert SignRoundSettings(batch_size=8, chunk_tokens=2048).chunk_samples(256) == 8  # 2048 tokens: one chunk
    assert SignRoundSettings(batch_size=8, chunk_tokens=2048).chunk_samples(512) == 4
    assert SignRoundSettings(batch_size=8, chunk_tokens=2048).chunk_samples(4096) == 1  # at least one sample
    assert SignRoundSettings(batch_size=2, chunk_tokens=2048).chunk_samples(16) == 2  # never above batch_size
    for bad in (0, -5, 1.5, True, "2048"):
        with pytest.raises(ValueError, match="chunk_tokens="):
            SignRoundSettings(chunk_tokens=bad)
    with pytest.raises(ValueError, match="chunk_tokens="):
        TuningOptions.from_config(AutoRoundConfig(bits=4, group_size=32, iters=2), chunk_tokens=0)
    assert TuningOptions.from_config(AutoRoundConfig(bits=4, group_size=32, iters=2),
                                     chunk_tokens=24).signround.chunk_tokens == 24


def step_gradients(block, layers, inputs, targets, settings):
    """(loss, gradients of every tunable tensor) of one step on every sample, from fresh parameters."""
    params = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    for p in params.values():
        for t in (p.v, p.min_scale, p.max_scale):
            t.requires_grad_(True)
    with wrapped(block, layers, params) as wrappers:
        loss = _batch_loss(block, inputs, inputs.hidden, targets, torch.arange(inputs.nsamples), settings,
                           list(wrappers.values()))
    return loss, [t.grad.clone() for p in params.values() for t in (p.v, p.min_scale, p.max_scale)]


@pytest.mark.parametrize("kind", ["relative", "mse"])
@pytest.mark.parametrize("masked", [True, False])
def test_a_chunked_step_has_the_loss_and_gradients_of_one_batch(kind, masked):
    # padded: unequal padding, so the chunks hold unequal shares of the real tokens
    block, inputs, targets, layers = block_setup(n=6, pads=[0, 3, 9, 0, 15, 6] if masked else None)
    seq = inputs.hidden.shape[1]
    whole = step_gradients(block, layers, inputs, targets, SignRoundSettings(batch_size=6, loss=kind))
    for per_chunk in (1, 4):  # six chunks of one sample; chunks of four and two samples
        chunked = step_gradients(block, layers, inputs, targets,
                                 SignRoundSettings(batch_size=6, loss=kind, chunk_tokens=per_chunk * seq))
        assert abs(chunked[0] - whole[0]) <= 1e-5 * whole[0]
        for a, b in zip(chunked[1], whole[1]):
            assert float((a - b).norm()) <= 1e-4 * float(b.norm())  # float32 sums in another order
    assert any(g.abs().max() > 0 for g in whole[1])  # the comparison is not between zeros


def test_a_chunked_step_quantises_each_weight_once_and_forwards_at_most_a_chunk(monkeypatch):
    block, inputs, targets, layers = block_setup(n=8)
    calls, sizes = [], []
    quantized_weight = QdqLinear.quantized_weight
    monkeypatch.setattr(QdqLinear, "quantized_weight", lambda self: calls.append(self) or quantized_weight(self))
    block.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    seq = inputs.hidden.shape[1]
    settings = SignRoundSettings(iters=3, batch_size=8, chunk_tokens=3 * seq)  # chunks of 3, 3 and 2 samples
    result = tune_block(block, layers, inputs, inputs.hidden, targets, settings)
    assert sizes == [3, 3, 2] * 3
    assert len(calls) == 3 * len(layers)  # once per step, not once per chunk
    assert result.best_loss <= result.first_loss
