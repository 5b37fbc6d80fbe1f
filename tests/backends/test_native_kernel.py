"""Our compiled ``cpu_w4a8`` kernel (skipped where it cannot be built): its layout, exactness against a plain-torch
emulation of the int8 activations, closeness to the float reference, every dtype/shape path, and the clean
fallback when the library cannot be built."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_autoround.backends import available_backends, native, native_build, select_backend
from hf_autoround.backends.cpu_aten import int4_op_unfit
from hf_autoround.qdq import dequantize_weight
from hf_autoround.scheme import QuantScheme

from test_cpu_kernels import check, make_layer, rel_err

needs_native = pytest.mark.skipif(not native.available(), reason=f"{native.why_unavailable()}")


def w4a8_reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Plain torch: int8 activations per block of 32 (round to nearest even), float64 product, float64 result."""
    K = layer.in_features
    xf = x.float().reshape(-1, K)
    blocks = xf.reshape(xf.shape[0], K // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    q = torch.round(blocks * inv)
    xq = (q.double() * (amax / 127.0).double()).reshape_as(xf)
    w = dequantize_weight(layer.unpack(), dtype=torch.float64)
    bias = layer.bias.double() if layer.bias is not None else None
    return F.linear(xq, w, bias).reshape(*x.shape[:-1], layer.out_features)


def same_on_any_threads(kernel, x: torch.Tensor) -> torch.Tensor:
    """The kernel's output on one thread, after checking that two threads in every threading mode give the same
    bits (NaN where it has NaN)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel(x)
        torch.set_num_threads(2)
        for mode in native.THREADING:
            kernel.threading = native.THREADING[mode]
            torch.testing.assert_close(kernel(x), one, rtol=0, atol=0, equal_nan=True, msg=mode)
    finally:
        torch.set_num_threads(threads)
    return one


def test_pack_rows_layout_round_trips():
    codes = torch.randint(0, 16, (5, 96), dtype=torch.int32)
    packed = native.pack_rows(codes)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8
    assert int(packed[0, 3]) == int(codes[0, 3]) | (int(codes[0, 19]) << 4)  # byte j: codes j and j + 16
    assert torch.equal(native.unpack_rows(packed), codes)


def test_tile_layout_streams_four_rows_per_pair():
    codes = torch.randint(0, 16, (8, 96), dtype=torch.int32)  # 3 blocks -> 2 pairs, the last half padded
    tiled = native.tile_codes(codes)
    assert tiled.shape == (2, 2, 4, 32)
    rows = native.pack_rows(torch.nn.functional.pad(codes, (0, 32)))
    assert torch.equal(tiled[1, 0, 2], rows[6, :32]) and torch.equal(tiled[1, 1, 3], rows[7, 32:])
    assert int(tiled[0, 1, 0, 16:].max()) == 0  # padding is code 0
    assert torch.equal(native.untile_codes(tiled, 96), codes)


def test_group_tiles_and_compact_scales():
    per_group = torch.arange(3 * 8, dtype=torch.float32).reshape(3, 8)  # [G, N]
    tiled = native.tile_groups(per_group, 4)
    assert tiled.shape == (2, 4, 4)
    assert float(tiled[1, 2, 3]) == float(per_group[2, 7]) and float(tiled[0, 3, 0]) == 0.0
    assert native.compact_scales(torch.tensor([0.5, 1e-3], dtype=torch.float16)).dtype == torch.float16
    assert native.compact_scales(torch.tensor([0.1, 1e-9])).dtype == torch.float32


@needs_native
@pytest.mark.parametrize("scheme,shape", [(QuantScheme(4, 128, True), (576, 64)),  # 18 blocks, op group 64
                                          (QuantScheme(4, 32, False), (96, 32)),  # op group 32, odd block count
                                          (QuantScheme(2, 64, False), (256, 48)),
                                          (QuantScheme(4, -1, True), (512, 16))])
def test_w4a8_is_exact_against_int8_activation_emulation(scheme, shape):
    layer = make_layer(*shape, scheme, asym_extreme=not scheme.sym)
    x = torch.randn(5, shape[0], generator=torch.Generator().manual_seed(3))
    x[1, :32] = 0  # an all-zero block
    x[2, 40] = 50.0  # an outlier dominating its block
    ref = w4a8_reference(layer, x)
    y = native.W4A8Kernel(layer)(x)
    assert y.dtype == torch.float32
    assert rel_err(y, ref) < 2e-6


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w4a8_half_inputs_and_outputs_are_exact_up_to_one_rounding(dtype):
    layer = make_layer(256, 64, QuantScheme(4, 64, True))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).to(dtype)
    y = native.W4A8Kernel(layer)(x)
    assert y.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y.float(), w4a8_reference(layer, x).to(dtype).float(), rtol=eps, atol=1e-6)


@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("shape", [(64, 16), (256, 48), (576, 64), (512, 96), (96, 32)])
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
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, -1])
def test_every_instruction_set_build_gives_the_same_bits(group_size):
    """The AVX512-VNNI build (where this CPU has it) sums the same integers as the AVX2 one, and a batch shares the
    weight unpacking among 4 rows (tails of 1-3): below its batched path every output equals the AVX2 build's bit
    for bit; from there on (float sums in another order) it agrees to float32 rounding."""
    variants = native_build.usable_variants()
    layer = make_layer(512, 48, QuantScheme(4, group_size, False), asym_extreme=True)
    kernel = native.W4A8Kernel(layer)
    x = torch.randn(11, 512, generator=torch.Generator().manual_seed(6))
    kernel.lib = native.load_variant("avx2")
    assert native.batched_from(kernel.lib) == 0
    want = {m: kernel(x[:m]) for m in (1, 2, 3, 4, 5, 7, 8, 11)}
    torch.testing.assert_close(want[11].double(), w4a8_reference(layer, x), rtol=2e-6, atol=2e-6)
    assert torch.equal(want[5], want[11][:5])  # a row's result does not depend on the batch it is in
    for variant in variants:
        kernel.lib = native.load_variant(variant)
        assert kernel.lib.w4a8_vnni() == (variant == "avx512vnni")
        batched = native.batched_from(kernel.lib) or 10**9
        for m, y in want.items():
            if m < batched:
                assert torch.equal(kernel(x[:m]), y), (variant, m)
            else:
                torch.testing.assert_close(kernel(x[:m]), y, rtol=2e-6, atol=2e-6)


needs_batched = pytest.mark.skipif(not native.available() or not native.batched_from(),
                                   reason="this CPU's build has no batched path (needs AVX512-VNNI)")


@needs_batched
@pytest.mark.parametrize("scheme,shape", [(QuantScheme(4, 128, True), (512, 80)),  # 2 panels + 16 rows of tail
                                          (QuantScheme(4, 32, False), (96, 64)),  # op group 32, odd block count
                                          (QuantScheme(2, 64, False), (256, 32)),
                                          (QuantScheme(4, -1, True), (512, 16)),  # no whole panel: one-row path
                                          (QuantScheme(3, 128, False), (256, 96))])
def test_batched_path_is_exact_against_int8_activation_emulation(scheme, shape):
    layer = make_layer(*shape, scheme, asym_extreme=not scheme.sym)
    kernel = native.W4A8Kernel(layer)
    m = native.batched_from() * 4 + 5  # whole tiles of 4 rows and a tail of one
    x = torch.randn(m, shape[0], generator=torch.Generator().manual_seed(8))
    x[1, :32] = 0
    x[2, 40] = 50.0
    y = kernel(x)
    assert rel_err(y, w4a8_reference(layer, x)) < 2e-6
    assert torch.equal(kernel(x[:native.batched_from()]), y[:native.batched_from()])  # independent of the batch
    for dtype in (torch.bfloat16, torch.float16):
        half = kernel(x.to(dtype))
        assert half.dtype == dtype
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(half.float(), w4a8_reference(layer, x.to(dtype)).to(dtype).float(), rtol=eps,
                                   atol=1e-6)


@needs_batched
def test_batched_path_non_finite_inputs_and_threads():
    layer = make_layer(256, 64, QuantScheme(4, 128, True))
    kernel = native.W4A8Kernel(layer)
    x = torch.randn(native.batched_from() + 3, 256, generator=torch.Generator().manual_seed(9))
    x[0, 5], x[1, 100] = float("nan"), float("inf")
    one = same_on_any_threads(kernel, x)
    assert one[0].isnan().all() and not one[1].isfinite().any() and one[2:].isfinite().all()


@needs_native
def test_w4a8_float32_scales_path():
    layer = make_layer(256, 32, QuantScheme(4, 32, False))
    kernel = native.W4A8Kernel(layer)
    x = torch.randn(2, 256)
    y16 = kernel(x)
    kernel.scale = kernel.scale.float()
    assert torch.equal(kernel(x), y16)


@needs_native
def test_w4a8_threads_batches_and_odd_inputs_agree():
    layer = make_layer(512, 16 * 5, QuantScheme(4, 128, True))  # 80 rows: one chunk of 64 plus a tail
    kernel = native.W4A8Kernel(layer)
    x = torch.randn(9, 512, generator=torch.Generator().manual_seed(5))
    one = same_on_any_threads(kernel, x)
    rows = torch.cat([kernel(x[i]).unsqueeze(0) for i in range(9)])  # 1-D inputs, one row at a time
    if 0 < native.batched_from() <= 9:  # the batch took the batched path: float sums in another order
        torch.testing.assert_close(rows, one, rtol=2e-6, atol=2e-6)
    else:
        assert torch.equal(rows, one)
    assert torch.equal(kernel(x.t().contiguous().t()), one)  # non-contiguous input
    assert kernel(x[:0]).shape == (0, 80)
    zeros = kernel(torch.zeros(2, 512))
    torch.testing.assert_close(zeros, layer.bias.expand(2, -1), rtol=0, atol=1e-6)


@needs_native
@pytest.mark.parametrize("threading", ["pool", "openmp", "auto"])
def test_parallel_runs_every_item_once_and_other_threads_join(threading):
    runs, by_worker = native.parallel_check(threading, threads=1, n_items=50)
    assert runs.eq(1).all() and not by_worker.any()
    # Another thread must join a job of slow items. The pool lets the caller do everything while a worker has no
    # core, which on a loaded shared machine can last a whole job, so give it several jobs (seconds in all).
    for _ in range(25):
        runs, by_worker = native.parallel_check(threading, threads=3, n_items=40, sleep_us=2000)
        assert runs.eq(1).all()
        if by_worker.any():
            break
    else:
        pytest.fail("no worker thread ran an item in 25 jobs of 80 ms")
    for _ in range(200):  # many short jobs back to back: no item lost or run twice across generations
        runs, _ = native.parallel_check(threading, threads=2, n_items=7)
        assert runs.eq(1).all()


@needs_native
def test_w4a8_non_finite_inputs_give_non_finite_outputs():
    layer = make_layer(128, 16, QuantScheme(4, 32, True))
    x = torch.randn(3, 128)
    x[0, 5], x[1, 100] = float("nan"), float("inf")
    y = native.W4A8Kernel(layer)(x)
    assert y[0].isnan().all() and not y[1].isfinite().any() and y[2].isfinite().all()


@needs_native
def test_w4a8_follows_bias_changes():
    layer = make_layer(128, 32, QuantScheme(4, 32, True))
    kernel = native.W4A8Kernel(layer)
    x = torch.randn(2, 128)
    before = kernel(x)
    layer.bias.data.add_(1.0)
    torch.testing.assert_close(kernel(x), before + 1.0)
    layer.to(torch.bfloat16)
    assert kernel(x.bfloat16()).dtype == torch.bfloat16


def test_unavailable_native_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_AUTOROUND_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_lib_error", None)
    assert not native.available()
    assert "no C compiler found" in native.why_unavailable()
    avail = available_backends()
    assert "cpu_w4a8" not in avail
    spec = select_backend(QuantScheme(4, 128, True), 4096, 4096, "cpu", torch.bfloat16, "auto_round", avail)
    assert spec.name == "cpu_int4"
    with pytest.raises(ValueError, match="no C compiler found"):
        select_backend(QuantScheme(4, 128, True), 4096, 4096, "cpu", torch.bfloat16, "auto_round", avail,
                       forced="cpu_w4a8")


def test_failed_compile_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_AUTOROUND_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="compiling .* failed"):
        native_build.build(native.SOURCE, "false")
