"""``grid.GridWeight``: tuning's view of a GGUF type's grid (fixed scales, re-chosen codes) against the block
modules and the ``gguf`` package's own dequantisers."""
from __future__ import annotations

import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf_test_helpers import one_thread  # noqa: F401 (autouse fixture)

from hf_autoround.export.gguf import mixes
from hf_autoround.export.gguf.grid import GridWeight, block_params, qdq

MODULES = sorted(mixes.BLOCK_MODULES.values(), key=lambda m: m.TYPE.name)


def _weight(rows=4, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[1, :256] = 0.0  # an all-zero super-block: a = 0 there
    return w


def _v(w, seed=1):
    return torch.rand(w.shape, generator=torch.Generator().manual_seed(seed)) - 0.5


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.TYPE.name)
def test_written_params_read_back_as_the_tuned_values(mod):
    """What a GGUF reader gets from the packed parameters is the grid's exact dequantisation, and equals the
    tuning's differentiable values up to float rounding; codes stay in the type's range."""
    w, v = _weight(), _v(_weight())
    grid = GridWeight.of(w, mod.TYPE)
    params = grid.params(w, v)
    lo, hi = mod.CODES
    assert params["q"].min() >= lo and params["q"].max() <= hi
    exact = grid.dequantize(params)
    packed = mod.pack(params)
    theirs = torch.from_numpy(gguf_dequantize(packed.reshape(w.shape[0], -1), mod.TYPE)).reshape(w.shape)
    assert torch.equal(exact, theirs)
    torch.testing.assert_close(grid.fake_quant(w, v), exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.TYPE.name)
def test_zero_v_stays_close_to_the_plain_quantisation(mod):
    """With v = 0 the codes are (up to rounding ties) the module's own round-to-nearest."""
    w = _weight()
    grid = GridWeight.of(w, mod.TYPE)
    same = (grid.params(w)["q"] == grid.fixed["q"]).float().mean()
    assert same > 0.999
    plain = mod.dequantize(grid.fixed).reshape(w.shape)
    assert (qdq(w, mod.TYPE) - plain).abs().max() <= grid.a.abs().max() + 1e-7


def test_v_moves_codes_by_at_most_one_and_changes_the_result():
    w, v = _weight(), _v(_weight())
    grid = GridWeight.of(w, "q4_k")
    moved = grid.params(w, v)["q"] - grid.params(w)["q"]
    assert moved.abs().max() == 1 and (moved != 0).any()
    assert not torch.equal(qdq(w, "q4_k", v), qdq(w, "q4_k"))
    assert torch.equal(qdq(w, "q4_k", v), grid.dequantize(block_params(w, "q4_k", v)))


def test_gradient_is_straight_through_inside_the_code_range():
    w = _weight()
    grid = GridWeight.of(w, "q4_k")
    v = torch.zeros_like(w, requires_grad=True)
    grid.fake_quant(w, v).sum().backward()
    x = (w - grid.b) * grid.inv_a
    inside = (x.round() >= grid.lo) & (x.round() <= grid.hi)
    assert torch.equal(v.grad, torch.where(inside, grid.a, torch.zeros_like(w)))


def test_rows_that_do_not_fit_the_block_are_refused():
    with pytest.raises(ValueError, match="multiples of 256"):
        GridWeight.of(torch.randn(4, 576), "q4_k")
