"""The block losses: plain MSE over real tokens, and the per-token relative MSE that SignRound tunes on."""
from __future__ import annotations

import pytest
import torch

from hf_autoround.config import AutoRoundConfig
from hf_autoround.tuning.block_loss import LOSSES, block_loss, chunked_mse
from hf_autoround.tuning.options import TuningOptions
from hf_autoround.tuning.signround import SignRoundSettings


def pair(seed=0, b=2, seq=5, hidden=8):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(b, seq, hidden, generator=g)
    return target + 0.1 * torch.randn(b, seq, hidden, generator=g), target


def test_mse_is_the_mean_over_tokens_and_units():
    pred, target = pair()
    assert torch.allclose(block_loss(pred, target, None, "mse"), ((pred - target) ** 2).mean())


def test_relative_is_the_mean_of_each_tokens_error_over_its_target_power():
    pred, target = pair()
    expected = ((pred - target) ** 2).mean(-1) / (target ** 2).mean(-1)
    assert torch.allclose(block_loss(pred, target, None, "relative"), expected.mean())


def test_relative_does_not_see_a_tokens_scale():
    pred, target = pair()
    scale = torch.ones(2, 5, 1)
    scale[0, 0] = 1000.0  # one massive token, its error as large in proportion
    relative = block_loss(pred * scale, target * scale, None, "relative")
    assert torch.allclose(relative, block_loss(pred, target, None, "relative"))
    mse = block_loss(pred * scale, target * scale, None, "mse")
    first = ((pred[0, 0] - target[0, 0]) * 1000) ** 2
    assert first.sum() / 80 > 0.99 * mse  # the plain MSE is nearly all that one token


@pytest.mark.parametrize("kind", LOSSES)
def test_masked_tokens_count_for_nothing(kind):
    pred, target = pair()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    garbage = pred.clone()
    garbage[1, 3:] = 1e6
    masked = block_loss(garbage, target, mask, kind)
    expected = torch.cat([(pred - target)[0], (pred - target)[1, :3]]).pow(2)
    if kind == "relative":
        power = torch.cat([target[0], target[1, :3]]).pow(2).mean(-1)
        assert torch.allclose(masked, (expected.mean(-1) / power).mean())
    else:
        assert torch.allclose(masked, expected.mean())


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("samples", [1, 2, 3, 8])  # 3 does not divide the 7 samples: a short last chunk
def test_chunked_mse_is_the_whole_sets_mse(masked, samples):
    pred, target = pair(b=7)
    mask = None
    if masked:
        mask = torch.ones(7, 5, dtype=torch.long)
        mask[2, 1:] = 0
        mask[6, 4:] = 0
        pred[2, 1:] = 1e6  # padding: must count for nothing
    expected = float(block_loss(pred, target, mask, "mse"))
    assert chunked_mse(pred, target, mask, samples) == pytest.approx(expected, rel=1e-6)


def test_chunked_mse_of_an_all_padding_set_is_zero():
    pred, target = pair(b=2)
    assert chunked_mse(pred, target, torch.zeros(2, 5, dtype=torch.long)) == 0.0


def test_relative_is_zero_on_a_perfect_match_even_for_zero_tokens():
    target = torch.zeros(1, 3, 4)
    target[0, 1] = 2.0
    assert block_loss(target.clone(), target, None, "relative").item() == 0.0
    assert torch.isfinite(block_loss(target + 1e-3, target, None, "relative"))


def test_an_unknown_kind_is_refused():
    pred, target = pair()
    with pytest.raises(ValueError, match="loss='l1'"):
        block_loss(pred, target, None, "l1")
    with pytest.raises(ValueError, match="loss='l1': expected one of"):
        SignRoundSettings(loss="l1")


def test_the_option_reaches_the_settings():
    config = AutoRoundConfig(bits=4, group_size=32, iters=2)
    assert TuningOptions.from_config(config).signround.loss == SignRoundSettings().loss
    for kind in LOSSES:
        assert TuningOptions.from_config(config, loss=kind).signround.loss == kind
    with pytest.raises(ValueError, match="loss='huber'"):
        TuningOptions.from_config(config, loss="huber")
