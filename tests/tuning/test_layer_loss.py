"""Per-layer losses for the quality report: each planned linear's output MSE against the float layer, with RTN
parameters and with the kept ones, on the input it saw inside the quantised block."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tuning_helpers import one_thread  # noqa: F401 (autouse fixture)

from conftest import build_tiny_model

from hf_autoround import AutoRoundConfig
from hf_autoround.qdq import qdq
from hf_autoround.quantize import quantize_model
from hf_autoround.scheme import QuantScheme
from hf_autoround.tuning import TuningReport
from hf_autoround.tuning.layer_loss import FirstInputs, layer_losses
from hf_autoround.tuning.signround import LayerParams, wrapped

SCHEME = QuantScheme(bits=3, group_size=16, sym=True)


def _block():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32))


def _mse(a, b):
    return float((a - b).detach().pow(2).mean())


def test_losses_match_a_direct_computation():
    block, x = _block(), torch.randn(4, 5, 32)
    layers = {"0": SCHEME, "2": SCHEME}
    params = {n: LayerParams.initial(block.get_submodule(n).weight, s) for n, s in layers.items()}
    params["0"].v.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    first = block[0].weight.detach().clone()
    with wrapped(block, layers, params):
        with FirstInputs(block, layers) as seen:
            block(x)
            block(x + 1)  # only the first call is kept
        losses = layer_losses(block, seen.inputs, layers)
    assert torch.equal(seen.inputs["0"], x[:1])  # the first sample of the first call
    reference = F.linear(x[:1], first, block[0].bias)
    rtn = F.linear(x[:1], qdq(first, SCHEME), block[0].bias)
    tuned = F.linear(x[:1], qdq(first, SCHEME, v=params["0"].v), block[0].bias)
    assert math.isclose(losses["0"][0], _mse(rtn, reference), rel_tol=1e-5)
    assert math.isclose(losses["0"][1], _mse(tuned, reference), rel_tol=1e-5)
    assert losses["0"][0] != losses["0"][1]
    assert losses["2"][0] == losses["2"][1]  # untouched parameters: RTN is what was kept
    assert type(block[0]) is nn.Linear and type(block[2]) is nn.Linear  # the wrappers are gone again


def test_every_tuned_layer_is_reported():
    model = build_tiny_model("llama")
    report = TuningReport()
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 200, (16,), generator=g) for _ in range(4)]
    config = AutoRoundConfig(bits=4, group_size=32, iters=3, nsamples=4, seqlen=16, batch_size=2)
    quantize_model(model, config, dataset=data, progress=False, report=report)
    for block in report.blocks:
        assert len(block.layer_losses) == block.layers == 7
        assert all(rtn > 0 and tuned > 0 for rtn, tuned in block.layer_losses.values())
