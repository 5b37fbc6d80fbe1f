import pytest
import torch

from hf_autoround.formats import canonical_format, default_packing_format, get_layout
from hf_autoround.formats.awq import NIBBLE_OF_ELEMENT
from hf_autoround.qdq import quantize_weight
from hf_autoround.scheme import QuantScheme

SHAPES = [(64, 32), (128, 96), (576, 192), (96, 64)]


def _qw(out_f, in_f, scheme, seed=0):
    torch.manual_seed(seed)
    return quantize_weight(torch.randn(out_f, in_f), scheme)


@pytest.mark.parametrize("fmt", ["auto_round", "auto_round:auto_gptq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("shape", SHAPES)
def test_gptq_family_round_trip(fmt, bits, sym, group_size, shape):
    in_f, out_f = shape
    scheme = QuantScheme(bits, group_size, sym)
    layout = get_layout(fmt)
    if layout.can_hold(in_f, out_f, scheme):
        pytest.skip("shape not packable at this width")
    qw = _qw(out_f, in_f, scheme)
    if fmt == "auto_round:auto_gptq":
        qw.zeros.clamp_(min=1)  # GPTQ v1 cannot store a zero point of 0
    tensors = layout.pack(qw)
    for name, (spec_shape, dtype) in layout.tensor_specs(in_f, out_f, scheme).items():
        assert tuple(tensors[name].shape) == tuple(spec_shape) and tensors[name].dtype == dtype, name
    back = layout.unpack(tensors, in_f, out_f, scheme)
    assert torch.equal(back.codes, qw.codes)
    assert torch.equal(back.zeros, qw.zeros)
    assert torch.equal(back.scales, qw.scales)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_round_trip(shape, group_size):
    in_f, out_f = shape
    scheme = QuantScheme(4, group_size, False)
    qw = _qw(out_f, in_f, scheme, seed=3)
    layout = get_layout("auto_round:auto_awq")
    back = layout.unpack(layout.pack(qw), in_f, out_f, scheme)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.zeros, qw.zeros)


def test_awq_nibble_interleave():
    codes = torch.arange(8, dtype=torch.int32).repeat(32, 1)  # column e holds value e
    qw = _qw(8, 32, QuantScheme(4, 32, False))
    qw.codes = codes
    word = get_layout("awq").pack(qw)["qweight"][0, 0].item() & 0xFFFFFFFF
    for element, nibble in enumerate(NIBBLE_OF_ELEMENT):
        assert (word >> (4 * nibble)) & 0xF == element


def test_gptq_v1_stores_zero_minus_one():
    qw = _qw(32, 64, QuantScheme(4, 32, True))
    packed = get_layout("auto_round:auto_gptq").pack(qw)
    assert (packed["qzeros"] == 0x77777777).all()
    assert (get_layout("auto_round").pack(qw)["qzeros"] == -0x77777778).all()  # 0x88888888 as int32


def test_gptq_v1_refuses_zero_point_zero():
    qw = _qw(32, 64, QuantScheme(4, 32, False))
    qw.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="zero point of 0"):
        get_layout("auto_round:auto_gptq").pack(qw)


def test_awq_refuses_other_bits():
    assert "4-bit" in get_layout("auto_round:auto_awq").can_hold(64, 64, QuantScheme(2, 32, False))


def test_format_names_and_defaults():
    assert canonical_format("auto_round:gptq") == "auto_round:auto_gptq"
    assert canonical_format("auto_round:awq") == "auto_round:auto_awq"
    assert default_packing_format(QuantScheme(4, 128, True)) == "auto_round:auto_gptq"
    assert default_packing_format(QuantScheme(4, 128, False)) == "auto_round"
    with pytest.raises(ValueError, match="packing_format='nope' is unknown"):
        canonical_format("nope")
