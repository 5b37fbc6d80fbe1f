"""Every CPU kernel against the plain-torch reference on random layers: shapes, bits, group sizes, sym/asym, formats
and activation dtypes. The repacks are exact (the integer weight the op sees equals ours); the products differ from
the float32 reference only by bfloat16 rounding of activations and scales, bounded per dtype below."""
from __future__ import annotations

import pytest
import torch

from hf_autoround.backends import available_backends
from hf_autoround.backends.cpu_aten import (AtenInt4Kernel, AtenInt8Kernel, int4_operand, int4_op_unfit,
                                            op_group_size)
from hf_autoround.backends.torch_ref import TorchReferenceKernel
from hf_autoround.qdq import dequantize_weight, quantize_weight
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.scheme import QuantScheme

pytestmark = pytest.mark.skipif(not {"cpu_int4", "cpu_int8"} <= available_backends(),
                                reason="torch lacks the CPU int4/int8 weight-only ops")

# max |y - y_ref| / max |y_ref| against the float32 reference
TOL = {torch.float32: 1.5e-2, torch.bfloat16: 3e-2, torch.float16: 1.5e-2}


def make_layer(in_f, out_f, scheme, fmt=None, bias=True, seed=0, asym_extreme=False):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    if asym_extreme:  # one-sided weights push zero points to the ends of the range
        w = w.abs() * torch.where(torch.rand(out_f, 1, generator=gen) > 0.5, 1.0, -1.0)
    qw = quantize_weight(w, scheme)
    if fmt is None:
        fmt = "auto_round:auto_gptq" if scheme.sym else "auto_round"
    b = torch.randn(out_f, generator=gen) * 0.1 if bias else None
    return QuantLinear.from_quantized(qw, fmt, bias=b)


def rel_err(y, ref):
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def check(kernel_cls, layer, dtype, m=3):
    x = torch.randn(2, m, layer.in_features, generator=torch.Generator().manual_seed(7))
    ref = TorchReferenceKernel(layer)(x.to(dtype).float())
    y = kernel_cls(layer)(x.to(dtype))
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    err = rel_err(y, ref)
    assert err < TOL[dtype], f"relative error {err:.3g} for {dtype}"
    return err


SHAPES = [(64, 16), (128, 32), (256, 48), (576, 64), (512, 128), (96, 32)]


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_kernel_matches_reference(bits, group_size, sym, shape):
    in_f, out_f = shape
    scheme = QuantScheme(bits, group_size, sym)
    if bits == 3 and (in_f % 32 or out_f % 32):
        pytest.skip("3-bit GPTQ packing needs multiples of 32")
    if int4_op_unfit(scheme, in_f, out_f):
        pytest.skip(int4_op_unfit(scheme, in_f, out_f))
    layer = make_layer(in_f, out_f, scheme)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check(AtenInt4Kernel, layer, dtype)


@pytest.mark.parametrize("fmt", ["auto_round:auto_gptq", "auto_round", "auto_round:auto_awq"])
def test_int4_kernel_all_formats(fmt):
    scheme = QuantScheme(4, 128, sym=fmt != "auto_round:auto_awq")
    layer = make_layer(256, 64, scheme, fmt=fmt)
    check(AtenInt4Kernel, layer, torch.bfloat16, m=5)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_int4_repack_is_exact(bits, sym):
    """The op's integer weight, read back through the op itself with unit activations, equals our dequantised
    weight (up to the bf16 scale the op holds)."""
    scheme = QuantScheme(bits, 64, sym)
    layer = make_layer(256, 32, scheme, bias=False, asym_extreme=not sym)
    qw = layer.unpack()
    op = int4_operand(qw)
    eye = torch.eye(256, dtype=torch.bfloat16)
    w_op = op(eye).float()  # [in, out]: row i is the weight column of input i
    scales_bf16 = qw.scales.float().to(torch.bfloat16).float()
    expected = dequantize_weight(type(qw)(qw.codes, scales_bf16, qw.zeros, qw.scheme)).t()
    if sym or bits < 4:  # codes shifted into 0..15 with zero 0: products of bf16 scale and small ints
        torch.testing.assert_close(w_op, expected.to(torch.bfloat16).float(), rtol=0, atol=0)
    else:  # zero = (8 - zp) * scale is rounded to bf16 as well
        assert rel_err(w_op, expected) < 1e-2


def test_int4_repack_uses_exact_shift_when_it_fits():
    layer = make_layer(128, 32, QuantScheme(4, 32, True), bias=False)
    op = int4_operand(layer.unpack())
    assert float(op.sz[..., 1].abs().max()) == 0.0


@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(64, 16), (256, 48), (576, 64), (512, 128), (100, 24)])
def test_int8_kernel_matches_reference(group_size, sym, shape):
    in_f, out_f = shape
    scheme = QuantScheme(8, group_size, sym)
    from hf_autoround.backends.cpu_aten import int8_unfit

    if int8_unfit(scheme, in_f, out_f):
        pytest.skip(int8_unfit(scheme, in_f, out_f))
    layer = make_layer(in_f, out_f, scheme, asym_extreme=not sym)
    kernel = AtenInt8Kernel(layer)
    assert kernel.mode == ("int8pack" if scheme.n_groups(in_f) == 1 else "two_int4")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check(AtenInt8Kernel, layer, dtype)


@pytest.mark.parametrize("group_len,in_f,expected", [
    (128, 4096, 128), (-1, 4096, 256), (128, 576, 64), (96, 384, 32), (128, 64, 64), (48, 96, None), (32, 48, None),
])
def test_op_group_size(group_len, in_f, expected):
    glen = in_f if group_len == -1 else group_len
    assert op_group_size(glen, in_f) == expected


def test_batch_shapes_and_large_m():
    layer = make_layer(256, 64, QuantScheme(4, 128, True))
    for m in (1, 7, 130):
        check(AtenInt4Kernel, layer, torch.bfloat16, m=m)
    x = torch.randn(256)
    assert AtenInt4Kernel(layer)(x).shape == (64,)


def test_kernel_state_is_not_in_state_dict():
    layer = make_layer(256, 64, QuantScheme(4, 128, True))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.kernel = AtenInt4Kernel(layer)
    layer(torch.randn(1, 256))
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k])
