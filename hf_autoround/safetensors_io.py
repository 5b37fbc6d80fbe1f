"""safetensors files read and written one tensor at a time, and files replaced atomically.

``safetensors.torch.save_file`` makes a bytes copy of every tensor before it writes, and ``safe_open`` maps the
whole file into the process (mapped pages count as resident memory while they are mapped). The low-memory mode and
the resume directory need neither: ``write_tensors`` writes the header and then each tensor's bytes straight from
its storage, loading each one (a zero-argument callable) only when it is written; ``read_tensor`` reads one tensor
with plain file reads into a fresh tensor. The layout is the standard one (8-byte little-endian header length, a
JSON header padded with spaces to a multiple of 8, then the data), so safetensors and transformers read the files.

``atomic_write`` writes through a temporary sibling, flushes it to disk and renames it over the target, so a kill
at any instant leaves either the old file or the new one.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}

if sys.byteorder != "little":  # safetensors data are little-endian; tensors are written from their own storage
    raise ImportError("hf_autoround.safetensors_io needs a little-endian machine")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype and shape up front, its data from ``load`` (a tensor or a callable)."""

    name: str
    dtype: torch.dtype
    shape: tuple
    load: Callable[[], torch.Tensor] | torch.Tensor

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorEntry":
        return cls(name, tensor.dtype, tuple(tensor.shape), tensor)

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _itemsize(self.dtype)

    def tensor(self) -> torch.Tensor:
        t = self.load() if callable(self.load) else self.load
        if t.dtype != self.dtype or tuple(t.shape) != tuple(self.shape):
            raise ValueError(f"tensor {self.name!r}: expected {self.dtype} {list(self.shape)}, "
                             f"got {t.dtype} {list(t.shape)}")
        return t


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _byte_view(t: torch.Tensor):
    """The tensor's bytes as a numpy array that shares its storage (a copy only when it is not contiguous)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    return t.view(torch.uint8).numpy() if t.numel() else b""


def write_tensors(path: str, entries: Iterable[TensorEntry], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, tensor by tensor, in the order given; returns the bytes of tensor data."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {e.name!r}: dtype {e.dtype} cannot be stored in safetensors")
        if e.name in header:
            raise ValueError(f"tensor {e.name!r} is given twice")
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": [int(s) for s in e.shape],
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for e in entries:
            f.write(_byte_view(e.tensor()))
        f.flush()
        os.fsync(f.fileno())
    return offset


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    path: str
    dtype: torch.dtype
    shape: tuple
    start: int  # absolute file offset of its first byte
    nbytes: int


def read_header(path: str) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(tensor name -> StoredTensor, metadata) of a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        header = json.loads(f.read(size).decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does not know")
        begin, end = info["data_offsets"]
        tensors[name] = StoredTensor(path, DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, end - begin)
    return tensors, metadata


def read_tensor(stored: StoredTensor, handle=None, own_mapping: bool = False) -> torch.Tensor:
    """One tensor from its file, read into a new tensor (``handle``: an open binary file of that path, optional).
    ``own_mapping``: the tensor gets an anonymous memory mapping of its own instead of malloc'd memory, so freeing
    it returns its pages to the system at once and leaves no hole in the malloc heap (for big tensors that live
    for one block: see ``tuning.lazy_blocks``)."""
    if _numel(stored.shape) * _itemsize(stored.dtype) != stored.nbytes:
        raise ValueError(f"{stored.path}: a tensor's byte range does not match its shape and dtype")
    if stored.nbytes == 0:
        return torch.empty(stored.shape, dtype=stored.dtype)
    if own_mapping:
        buffer = mmap.mmap(-1, stored.nbytes)
        out = torch.frombuffer(buffer, dtype=torch.uint8).view(stored.dtype).reshape(stored.shape)
    else:
        out = torch.empty(stored.shape, dtype=stored.dtype)
        buffer = out.reshape(-1).view(torch.uint8).numpy()
    f = handle if handle is not None else open(stored.path, "rb")
    try:
        f.seek(stored.start)
        if f.readinto(buffer) != stored.nbytes:
            raise ValueError(f"{stored.path} is truncated")
    finally:
        if handle is None:
            f.close()
    return out


def atomic_write(path: str, write: Callable[[str], object]) -> None:
    """``write(tmp_path)`` then rename over ``path``; the directory entry is flushed too."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_directory(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(path: str, data) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


def sync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
