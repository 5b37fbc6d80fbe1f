import pytest
import torch

from hf_autoround.qdq import dequantize_weight, qdq, quantize_weight
from hf_autoround.scheme import QuantScheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("in_f,group_size", [(64, 32), (576, 128), (100, 32), (48, -1)])
def test_dequantize_of_quantize_equals_qdq(bits, sym, in_f, group_size):
    torch.manual_seed(0)
    w = torch.randn(24, in_f)
    scheme = QuantScheme(bits, group_size, sym)
    qw = quantize_weight(w, scheme)
    assert qw.codes.shape == (in_f, 24)
    assert qw.scales.shape == (scheme.n_groups(in_f), 24) and qw.scales.dtype == torch.float16
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= scheme.maxq
    torch.testing.assert_close(dequantize_weight(qw), qdq(w, scheme), rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_is_bounded_by_the_step(bits):
    """Asym: half a step everywhere. Sym full range: the grid's top code is 2^(b-1)-1, so the side opposite the
    extreme may be clipped by up to one step, never more."""
    torch.manual_seed(1)
    w = torch.randn(16, 128)
    for sym, bound in ((False, 0.5), (True, 1.0)):
        scheme = QuantScheme(bits, 32, sym)
        qw = quantize_weight(w, scheme)
        step = qw.scales.float().abs().index_select(0, qw.group_index()).t()
        err = (dequantize_weight(qw) - w).abs()
        assert (err <= step * bound + 1e-4).all()
        assert (err <= step * 0.5 + 1e-4).float().mean() > 0.95


def test_sym_full_range_maps_the_extreme_to_the_lowest_code():
    w = torch.tensor([[0.5, -1.0, 0.25, 0.0] * 8, [2.0, -0.5, 0.1, 0.3] * 8])
    qw = quantize_weight(w, QuantScheme(4, 32, True))
    assert (qw.zeros == 8).all()
    assert qw.codes[1, 0].item() == 0 and qw.scales[0, 0].item() == pytest.approx(1.0 / 8)  # -1.0 -> code 0
    assert qw.codes[0, 1].item() == 0 and qw.scales[0, 1].item() == pytest.approx(-2.0 / 8)  # +2.0 -> code 0
    torch.testing.assert_close(dequantize_weight(qw), w, rtol=0, atol=0.13)


def test_partial_last_group_is_zero_padded():
    torch.manual_seed(2)
    w = torch.randn(8, 40)
    scheme = QuantScheme(4, 32, False)
    qw = quantize_weight(w, scheme)
    assert qw.scales.shape == (2, 8)
    padded = torch.nn.functional.pad(w, (0, 24))
    torch.testing.assert_close(dequantize_weight(qw), dequantize_weight(quantize_weight(padded, scheme))[:, :40])


def test_all_zero_group_quantizes_to_zero():
    w = torch.zeros(4, 32)
    for sym in (True, False):
        assert dequantize_weight(quantize_weight(w, QuantScheme(4, 32, sym))).abs().max() == 0


def test_rounding_perturbation_and_minmax_change_the_result():
    torch.manual_seed(3)
    w = torch.randn(8, 64)
    scheme = QuantScheme(4, 32, False)
    v = torch.full((8, 2, 32), 0.49)
    assert not torch.equal(qdq(w, scheme, v=v), qdq(w, scheme))
    assert not torch.equal(qdq(w, scheme, min_scale=torch.full((8, 2), 0.8)), qdq(w, scheme))


def test_qdq_passes_gradients_straight_through():
    w = torch.randn(4, 32)
    v = torch.zeros(4, 1, 32, requires_grad=True)
    qdq(w, QuantScheme(2, 32, True), v=v).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
