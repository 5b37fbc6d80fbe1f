"""``cpu_w4a8``: our own CPU kernel — 4-bit weights (any of our 2/3/4-bit schemes, mapped to 0..15 codes as for
the int4 op), activations quantised on the fly to int8 per block of 32 (like llama.cpp's Q8_0), integer dot
products with AVX2 ``maddubs`` and float accumulation per block (``kernels/w4a8_avx2.c``).

The C source is compiled on first use with the system C compiler into the cache folder
(``$HF_AUTOROUND_CACHE/kernels``, default ``~/.cache/hf_autoround/kernels``) and loaded with ctypes; ctypes releases
the GIL and the library runs its own OpenMP loop (it shares torch's libgomp once torch is loaded). No compiler, no
AVX2/FMA, or ``HF_AUTOROUND_NATIVE=0``: the backend reports itself unavailable and selection falls back to
``cpu_int4``. Nothing here is part of the install step, so installing never needs a compiler.

Numerics: activations lose precision to int8 per 32-block (relative error ~1/254 of the block maximum), weights are
exact, scales are float32; results are returned in the caller's dtype.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading

import torch

from .cpu_aten import _group_views, int4_op_unfit

logger = logging.getLogger(__name__)

def _source_path(name: str = "w4a8_avx2.c") -> str:
    """The kernel source: inside the package in a wheel install, in the checkout's kernels/ when editable."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "csrc", name), os.path.join(here, "..", "..", "kernels", name)):
        if os.path.isfile(path):
            return os.path.normpath(path)
    return os.path.join(here, "csrc", name)


SOURCE = _source_path()
BLOCK = 32
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-std=c11"]

_lock = threading.Lock()
_lib = None
_lib_error: str | None = None


def _cache_dir() -> str:
    base = os.environ.get("HF_AUTOROUND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_autoround"))
    return os.path.join(base, "kernels")


def _cpu_ok() -> str | None:
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"CPU capability {cap} (needs AVX2)"
    try:
        flags = open("/proc/cpuinfo").read()
        if " fma" not in flags or " avx2" not in flags:
            return "CPU lacks AVX2/FMA"
    except OSError:
        pass
    return None


def _build() -> str:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = os.path.join(_cache_dir(), f"w4a8_avx2-{digest}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(_cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=_cache_dir())
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *FLAGS, SOURCE, "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode:
            raise RuntimeError(f"compiling {SOURCE} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_library():
    """The ctypes library, compiled on first use; raises RuntimeError saying why when it cannot be had."""
    global _lib, _lib_error
    with _lock:
        if _lib is not None:
            return _lib
        if _lib_error is not None:
            raise RuntimeError(_lib_error)
        try:
            if os.environ.get("HF_AUTOROUND_NATIVE", "1") == "0":
                raise RuntimeError("disabled by HF_AUTOROUND_NATIVE=0")
            reason = _cpu_ok()
            if reason:
                raise RuntimeError(reason)
            lib = ctypes.CDLL(_build())
            p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
            lib.w4a8_quantize_act.argtypes = [p, i64, i64, i64, p, p, p]
            lib.w4a8_quantize_act.restype = None
            lib.w4a8_matmul.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i32]
            lib.w4a8_matmul.restype = None
            _lib = lib
            return lib
        except Exception as err:  # noqa: BLE001 - any failure means "not available"
            _lib_error = f"native kernel unavailable: {err}"
            logger.info(_lib_error)
            raise RuntimeError(_lib_error) from None


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


def pack_rows(codes_out_in: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]``: per block of 32, byte j holds code j (low nibble) and code j + 16 (high nibble)."""
    n, k = codes_out_in.shape
    c = codes_out_in.to(torch.uint8).reshape(n, k // BLOCK, 2, BLOCK // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    p = packed.reshape(n, half // (BLOCK // 2), BLOCK // 2)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(n, half * 2).to(torch.int32)


class W4A8Kernel:
    name = "cpu_w4a8"

    def __init__(self, layer):
        self.lib = load_library()
        self.layer = layer
        self.in_features, self.out_features = layer.in_features, layer.out_features
        qw = layer.unpack()
        op_group, scales, zeros = _group_views(qw)  # [K/op_group, N]
        zeros_per_row = qw.zeros.index_select(0, qw.group_index())
        shifted = qw.codes - zeros_per_row + 8
        del zeros_per_row
        if int(shifted.min()) >= 0 and int(shifted.max()) <= 15:
            codes, zero = shifted, torch.full_like(scales, 8.0)
        else:
            codes, zero = qw.codes, zeros.float()
        del shifted
        self.wq = pack_rows(codes.t())
        self.scale = scales.t().contiguous().float()  # [N, G]
        self.szero = (scales * zero).t().contiguous().float()
        self.blocks_per_group = op_group // BLOCK

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        K, N = self.in_features, self.out_features
        lead = x.shape[:-1]
        xf = x.reshape(-1, K).to(torch.float32).contiguous()
        M = xf.shape[0]
        nb = K // BLOCK
        G = nb // self.blocks_per_group
        xq = torch.empty(M, K, dtype=torch.int8)
        xs = torch.empty(M, nb, dtype=torch.float32)
        xsum = torch.empty(M, G, dtype=torch.float32)
        y = torch.empty(M, N, dtype=torch.float32)
        self.lib.w4a8_quantize_act(xf.data_ptr(), M, K, self.blocks_per_group, xq.data_ptr(), xs.data_ptr(),
                                   xsum.data_ptr())
        self.lib.w4a8_matmul(self.wq.data_ptr(), self.scale.data_ptr(), self.szero.data_ptr(), xq.data_ptr(),
                             xs.data_ptr(), xsum.data_ptr(), y.data_ptr(), M, N, K, self.blocks_per_group,
                             torch.get_num_threads())
        y = y.to(x.dtype)
        if self.layer.bias is not None:
            y = y + self.layer.bias.to(x.dtype)
        return y.reshape(*lead, N)
