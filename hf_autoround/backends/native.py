"""``cpu_w4a8``: our own CPU kernel (``kernels/w4a8_avx2.c``) — 4-bit weight codes (any of our 2/3/4-bit schemes,
mapped to 0..15 as for torch's int4 op) times activations quantised on the fly to int8 per block of 32 (like
llama.cpp's Q8_0), integer dot products with AVX2 ``maddubs`` (AVX512-VNNI ``dpbusd`` where the CPU has it) and
float accumulation per block and group; a prefill batch shares each unpacked weight piece among four activation rows.
In the AVX512-VNNI build a batch of ``batched_from()`` rows or more (8) runs instead as a register-blocked GEMM over
panels of 32 output rows unpacked once per call: the same integer dots, the float sums in another order.

At load the weights are repacked once into tiles of 4 output rows that the kernel streams front to back (see the C
source for the byte layout), with float16 scales (float32 when a scale is not exactly a float16) and int8 zero
points per op group. One call does everything in C: activation quantisation (in the caller's dtype: float32,
bfloat16 or float16), the product on ``torch.get_num_threads()`` threads, the bias, and the output in the caller's
dtype; no temporary tensors besides the output.

The library is compiled on first use (``native_build``); where that cannot happen (no compiler, no AVX2/FMA/F16C)
the backend reports itself unavailable and selection falls back to ``cpu_int4``. To keep it from running, choose
another backend: ``AutoRoundConfig(backend="cpu_int4")``.

Numerics: activations lose precision to int8 per block of 32 (error up to 1/254 of the block's largest magnitude);
weights and scales are exact; accumulation is float32.
"""
from __future__ import annotations

import ctypes
import logging
import threading

import torch

from . import native_build
from .cpu_aten import _group_views, int4_op_unfit

logger = logging.getLogger(__name__)

SOURCE = native_build.source_path("w4a8_avx2.c")
BLOCK = 32  # inputs per activation scale
PAIR = 64  # inputs per unit of the weight stream (two blocks)
TILE = 4  # output rows per tile
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# kernels/parallel.h: "openmp" = torch's OpenMP team, "pool" = our work-claiming pool, "auto" = the pool while the
# machine is oversubscribed (1-minute load average above the usable cores + 0.5), else OpenMP
THREADING = {"auto": 0, "openmp": 1, "pool": 2}

_lock = threading.Lock()
_lib = None
_lib_error: str | None = None


def load_variant(variant: str) -> ctypes.CDLL:
    """The library built for instruction-set ``variant`` (a key of ``native_build.VARIANTS``); raises RuntimeError."""
    lib = native_build.load(SOURCE, variant=variant)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.w4a8_linear.argtypes = [p, p, p, p, i64, i32, i32, i32]
    lib.w4a8_linear.restype = i32
    lib.w4a8_parallel_check.argtypes = [i32, i32, i64, i32, p, p]
    lib.w4a8_parallel_check.restype = None
    lib.w4a8_vnni.argtypes, lib.w4a8_vnni.restype = [], i32
    lib.w4a8_batched_from.argtypes, lib.w4a8_batched_from.restype = [], i32
    return lib


def _best_library():
    """The best build this CPU runs: AVX512-VNNI, else AVX2 (a failed VNNI build, e.g. an old compiler, is logged
    and falls back)."""
    variants = native_build.usable_variants()
    for variant in variants[:-1]:
        try:
            lib = load_variant(variant)
            logger.info("cpu_w4a8: using the %s build", variant)
            return lib
        except RuntimeError as err:
            logger.info("cpu_w4a8: the %s build is unavailable (%s); using AVX2", variant, err)
    return load_variant("avx2")


def load_library():
    """The ctypes library, compiled on first use; raises RuntimeError saying why when it cannot be had."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise RuntimeError(_lib_error)
        try:
            _lib = _best_library()
            return _lib
        except Exception as err:  # noqa: BLE001 - any failure means "not available"
            _lib_error = f"native kernel unavailable: {err}"
            logger.info(_lib_error)
            raise RuntimeError(_lib_error) from None


def instruction_set() -> str:
    """Which build runs: "avx512vnni" or "avx2" (raises RuntimeError when none can)."""
    return "avx512vnni" if load_library().w4a8_vnni() else "avx2"


def batched_from(lib=None) -> int:
    """From how many activation rows on a build takes its batched (register-blocked GEMM) path; 0 when it has none
    (the AVX2 build)."""
    return (lib or load_library()).w4a8_batched_from()


def parallel_check(threading: str, threads: int, n_items: int, sleep_us: int = 0):
    """Run trivial items the way the kernel runs its work: (executions per item, whether another thread than the
    caller ran it), int32 tensors."""
    lib = load_library()
    runs = torch.zeros(n_items, dtype=torch.int32)
    by_worker = torch.zeros(n_items, dtype=torch.int32)
    lib.w4a8_parallel_check(THREADING[threading], threads, n_items, sleep_us, runs.data_ptr(), by_worker.data_ptr())
    return runs, by_worker


def available() -> bool:
    try:
        load_library()
        return True
    except RuntimeError:
        return False


def why_unavailable() -> str:
    return "available" if available() else (_lib_error or "unknown reason")


def w4a8_unfit(scheme, in_features: int, out_features: int) -> str | None:
    if scheme.bits > 4:
        return f"{scheme.bits}-bit codes do not fit 4 bits"
    return int4_op_unfit(scheme, in_features, out_features)  # same op-group rule (groups of 32/64/128/256)


# ------------------------------------------------------------------------------------------------------ layout
def pack_rows(codes_out_in: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]``: per block of 32, byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    n, k = codes_out_in.shape
    c = codes_out_in.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    p = packed.reshape(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(n, half * 2).to(torch.int32)


def n_pairs(in_features: int) -> int:
    return (in_features + PAIR - 1) // PAIR


def tile_codes(codes_out_in: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N/4, pairs, 4, 32]``: rows packed as ``pack_rows`` (inputs padded with code 0 to whole pairs), then
    for every tile of 4 rows the 32-byte pieces of its rows pair after pair, so that one tile is one stream."""
    n, k = codes_out_in.shape
    npairs = n_pairs(k)
    padded = torch.nn.functional.pad(codes_out_in.to(torch.uint8), (0, npairs * PAIR - k))
    return pack_rows(padded).reshape(n // TILE, TILE, npairs, 32).transpose(1, 2).contiguous()


def untile_codes(tiled: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of ``tile_codes``: int32 codes ``[N, K]``."""
    tiles, npairs = tiled.shape[:2]
    rows = tiled.transpose(1, 2).reshape(tiles * TILE, npairs * 32)
    return unpack_rows(rows)[:, :in_features]


def tile_groups(per_group_out: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[G, N]`` per-op-group values -> ``[N/4, Gp, 4]`` (groups padded with zeros to ``n_groups``)."""
    g, n = per_group_out.shape
    padded = torch.nn.functional.pad(per_group_out, (0, 0, 0, n_groups - g))
    return padded.t().reshape(n // TILE, TILE, n_groups).transpose(1, 2).contiguous()


def compact_scales(scales: torch.Tensor) -> torch.Tensor:
    """float16 when every scale is exactly a float16 (checkpoint scales are), else float32."""
    half = scales.to(torch.float16)
    return half if torch.equal(half.float(), scales.float()) else scales.float()


def kernel_codes(qw):
    """(codes in 0..15 ``[K, N]``, op group size, scales ``[K/op, N]``, zero points ``[K/op, N]``): the codes
    shifted to a zero point of 8 when they fit (every symmetric and 2/3-bit layer), else raw."""
    op_group, scales, zeros = _group_views(qw)
    zeros_per_row = qw.zeros.index_select(0, qw.group_index())
    shifted = qw.codes - zeros_per_row + 8
    del zeros_per_row
    if int(shifted.min()) >= 0 and int(shifted.max()) <= 15:
        return shifted, op_group, scales, torch.full_like(zeros, 8)
    return qw.codes, op_group, scales, zeros


# ------------------------------------------------------------------------------------------------------ kernel
class LayerDesc(ctypes.Structure):
    """``layer_t`` of the C source: where a layer's repacked tensors are and their shape."""

    _fields_ = [("wq", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("zero", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("K", ctypes.c_int64), ("gb", ctypes.c_int64), ("scale_f32", ctypes.c_int64)]


class W4A8Kernel:
    """``threading``: how the kernel uses its ``torch.get_num_threads()`` threads, a key of ``THREADING``."""

    name = "cpu_w4a8"

    def __init__(self, layer, threading: str = "auto"):
        self.lib = load_library()
        self.threading = THREADING[threading]
        self.layer = layer  # for the bias (it may change dtype with model.to)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        codes, op_group, scales, zeros = kernel_codes(layer.unpack())
        self.blocks_per_group = op_group // BLOCK
        groups = 2 * n_pairs(self.in_features) if self.blocks_per_group == 1 else scales.shape[0]
        self.wq = tile_codes(codes.t())
        del codes
        self.scale = tile_groups(compact_scales(scales), groups)
        self.zero = tile_groups(zeros.to(torch.int8), groups)
        self._bias_key = None
        self._bias = None
        self._desc_for = (None, None, None)

    def _desc_ptr(self) -> int:
        """Address of the layer descriptor, rebuilt when one of the tensors it points to was replaced."""
        wq, scale, zero = self._desc_for
        if wq is not self.wq or scale is not self.scale or zero is not self.zero:
            self._desc = LayerDesc(self.wq.data_ptr(), self.scale.data_ptr(), self.zero.data_ptr(), self.out_features,
                                   self.in_features, self.blocks_per_group, self.scale.dtype == torch.float32)
            self._desc_addr = ctypes.addressof(self._desc)
            self._desc_for = (self.wq, self.scale, self.zero)
        return self._desc_addr

    def _bias_ptr(self):
        bias = self.layer.bias
        if bias is None:
            return None
        key = (bias.data_ptr(), bias.dtype, bias._version)
        if key != self._bias_key:
            self._bias = bias.detach().float().contiguous()
            self._bias_key = key
        return self._bias.data_ptr()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        if x.shape[-1] != K:
            raise ValueError(f"cpu_w4a8: expected {K} input features, got shape {tuple(x.shape)}")
        code = DTYPE_CODES.get(x.dtype)
        if code is None:
            raise TypeError(f"cpu_w4a8 takes float32/bfloat16/float16 activations, not {x.dtype}")
        if not x.is_contiguous():
            x = x.contiguous()
        y = torch.empty(x.shape[:-1] + (N,), dtype=x.dtype)
        M = x.numel() // K
        if M == 0:
            return y
        rc = self.lib.w4a8_linear(self._desc_ptr(), self._bias_ptr(), x.data_ptr(), y.data_ptr(), M, code,
                                  torch.get_num_threads(), self.threading)
        if rc:
            raise MemoryError("cpu_w4a8: no memory for the quantised activations")
        return y
