"""Keep float weights read straight from a safetensors file out of resident memory while they are not needed.

transformers maps checkpoint files into memory and, when the dtype matches, the float weights are views of that
mapping: once a weight has been read, its pages stay resident for as long as the file is mapped, which is as long
as any weight of the model lives. Measured on SmolLM2-135M (float32): freeing the linears of half the blocks left
the RSS where it was, and the NaN/Inf check before tuning, which reads every planned weight, brought the whole
model in at once. ``page_out`` asks the kernel to reclaim the whole pages of such a weight
(``madvise(MADV_PAGEOUT)``): nothing is lost (a page read again comes back from the file, a page written since
the load goes to swap or stays), so it is safe for weights still in use. Used after the NaN/Inf check and by
``quantize.pack_layer`` for the float weight it replaces. It only acts on memory that is a file
mapping; off Linux, on kernels before 5.4, or when the mapping cannot be read, it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import sys

import torch

logger = logging.getLogger(__name__)

MADV_PAGEOUT = 21
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def file_mapping_of(start: int, end: int) -> str | None:
    """The file whose mapping holds the whole address range [start, end), or None (anonymous memory, several
    mappings, or no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(x, 16) for x in fields[0].split("-"))
                if low <= start and end <= high:
                    path = fields[5].strip() if len(fields) > 5 else ""
                    return path if path.startswith("/") else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def page_out(weight: torch.Tensor) -> int:
    """Reclaim the resident whole pages of ``weight`` when it lives in a file mapping; returns the bytes of the
    range advised (0 when nothing was done)."""
    if not sys.platform.startswith("linux") or weight.device.type != "cpu":
        return 0
    storage = weight.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, (start + nbytes) // page * page
    if last <= first or file_mapping_of(start, start + nbytes) is None:
        return 0
    if _madvise()(first, last - first, MADV_PAGEOUT) != 0:
        logger.debug("madvise(MADV_PAGEOUT) failed (errno %d); the pages stay", ctypes.get_errno())
        return 0
    return last - first
