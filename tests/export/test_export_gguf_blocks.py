"""Each GGUF block module against the ``gguf`` package's own numpy dequantisers (an independent consumer)."""
from __future__ import annotations

import pytest
import torch
from gguf_test_helpers import one_thread  # noqa: F401 (autouse fixture)
from gguf.quants import dequantize as gguf_dequantize

from hf_autoround.export.gguf import mixes

MODULES = sorted(mixes.BLOCK_MODULES.values(), key=lambda m: m.TYPE.name)
# relative RMS error bounds on Gaussian weights (loose: they catch a broken grid, not a slightly worse one)
MAX_REL_RMSE = {"Q4_0": 0.12, "Q4_1": 0.1, "Q5_0": 0.06, "Q5_1": 0.05, "Q8_0": 0.01, "Q2_K": 0.4, "Q3_K": 0.2,
                "Q4_K": 0.1, "Q5_K": 0.05, "Q6_K": 0.03}




def _weights(rows=6, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[0, 3] = 0.9  # an outlier
    w[1] = w[1].abs()  # all non-negative
    w[2] = -w[2].abs()  # all non-positive
    w[3, :256] = 0.0  # an all-zero super-block
    w[4, :32] = 0.0125  # a constant block
    return w


def _roundtrip(mod, w, v=None):
    params = mod.quantize(w.reshape(-1, mod.BLOCK), v)
    ours = mod.dequantize(params).reshape(w.shape)
    packed = mod.pack(params)
    theirs = torch.from_numpy(gguf_dequantize(packed.reshape(w.shape[0], -1), mod.TYPE)).reshape(w.shape)
    return params, ours, theirs, packed


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.TYPE.name)
def test_pack_matches_gguf_dequantizer_exactly(mod):
    from gguf.constants import GGML_QUANT_SIZES

    w = _weights()
    params, ours, theirs, packed = _roundtrip(mod, w)
    block, type_size = GGML_QUANT_SIZES[mod.TYPE]
    assert block == mod.BLOCK and packed.shape == (w.numel() // block, type_size)
    assert torch.equal(ours, theirs)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[3, :256], torch.zeros(256))
    rel = ((ours - w)[5:].pow(2).mean() / w[5:].pow(2).mean()).sqrt().item()
    assert rel < MAX_REL_RMSE[mod.TYPE.name], rel


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.TYPE.name)
def test_rounding_perturbation_stays_on_the_stored_grid(mod):
    """SignRound's ``v`` moves codes; whatever it picks must still be exactly what a GGUF reader gets back."""
    w = _weights(seed=1)
    v = (torch.rand(w.numel() // mod.BLOCK, mod.BLOCK, generator=torch.Generator().manual_seed(2)) - 0.5)
    _, plain, _, _ = _roundtrip(mod, w)
    _, ours, theirs, _ = _roundtrip(mod, w, v)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_kquant_scales_are_double_quantised(name):
    """Sub-block scales (and mins) are small integers times one fp16 super-scale per 256 weights."""
    mod = next(m for m in MODULES if m.TYPE.name == name)
    params = mod.quantize(_weights().reshape(-1, 256))
    limits = {"Q2_K": (0, 15), "Q3_K": (-32, 31), "Q4_K": (0, 63), "Q5_K": (0, 63), "Q6_K": (-128, 127)}[name]
    for key in ("sc", "m"):
        if key in params:
            t = params[key]
            assert torch.equal(t, t.round()) and t.min() >= limits[0] and t.max() <= limits[1]
    assert params["d"].shape == (params["q"].shape[0], 1)
    assert torch.equal(params["d"], params["d"].half().float())


def test_gradient_flows_to_v():
    from hf_autoround.export.gguf import q4_k

    w = _weights().reshape(-1, 256)
    v = torch.zeros_like(w, requires_grad=True)
    q4_k.dequantize(q4_k.quantize(w, v)).pow(2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
