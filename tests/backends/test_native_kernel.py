"""Our compiled ``cpu_w4a8`` kernel against the reference (skipped where it cannot be built), its nibble layout,
and the clean fallback when it is unavailable."""
from __future__ import annotations

import pytest
import torch

from hf_autoround.backends import native, select_backend
from hf_autoround.backends.cpu_aten import int4_op_unfit
from hf_autoround.scheme import QuantScheme

from test_cpu_kernels import check, make_layer

needs_native = pytest.mark.skipif(not native.available(), reason=f"{native.why_unavailable()}")


def test_pack_rows_layout_round_trips():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.int32)
    packed = native.pack_rows(codes)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert int(packed[0, 3]) == int(codes[0, 3]) | (int(codes[0, 19]) << 4)  # byte j: codes j and j + 16
    assert torch.equal(native.unpack_rows(packed), codes)


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(64, 16), (256, 48), (576, 64), (512, 100 - 4)])
def test_w4a8_matches_reference(bits, group_size, sym, shape):
    in_f, out_f = shape
    scheme = QuantScheme(bits, group_size, sym)
    if bits == 3 and (in_f % 32 or out_f % 32):
        pytest.skip("3-bit GPTQ packing needs multiples of 32")
    if int4_op_unfit(scheme, in_f, out_f):
        pytest.skip(int4_op_unfit(scheme, in_f, out_f))
    layer = make_layer(in_f, out_f, scheme, asym_extreme=not sym)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 3, 17):
            check(native.W4A8Kernel, layer, dtype, m=m)


@needs_native
def test_w4a8_row_tail_and_zero_activations():
    layer = make_layer(128, 16 * 5 + 16, QuantScheme(4, 32, False))  # 96 rows: chunks of 64 plus a tail
    kernel = native.W4A8Kernel(layer)
    y = kernel(torch.zeros(2, 128))
    torch.testing.assert_close(y, layer.bias.expand(2, -1), rtol=0, atol=1e-6)
    check(native.W4A8Kernel, layer, torch.float32, m=2)


def test_unavailable_native_falls_back(monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_lib_error", "native kernel unavailable: no C compiler found")
    from hf_autoround.backends import available_backends

    avail = available_backends()
    assert "cpu_w4a8" not in avail
    spec = select_backend(QuantScheme(4, 128, True), 4096, 4096, "cpu", torch.bfloat16, "auto_round",
                          avail - {"cpu_int4"})
    assert spec.name == "torch"
    with pytest.raises(ValueError, match="no C compiler found"):
        select_backend(QuantScheme(4, 128, True), 4096, 4096, "cpu", torch.bfloat16, "auto_round", avail,
                       forced="cpu_w4a8")
