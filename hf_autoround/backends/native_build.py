"""Compile and load our C kernels (``kernels/*.c``) on first use.

The source is compiled with the system C compiler (``CC``, else ``gcc`` / ``cc``) into the cache folder
(``$HF_AUTOROUND_CACHE/kernels``, default ``~/.cache/hf_autoround/kernels``), named by a hash of source and flags,
and loaded with ctypes. ctypes releases the GIL during a call; the library's threads are torch's OpenMP team (the
same libgomp soname, already loaded by torch) or its own small pool (``kernels/parallel.h``). Each source is built
per instruction set (``VARIANTS``: AVX512-VNNI where the CPU has it, else AVX2). No compiler, a failed build or a
CPU without AVX2/FMA/F16C: loading raises ``RuntimeError`` saying why, and the backends that need the library
report themselves unavailable. Nothing here runs at install time, so installing never needs a compiler.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import torch

FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-pthread", "-shared", "-fPIC", "-std=gnu11"]
CPU_FLAGS = ("avx2", "fma", "f16c")
# builds of one source for different instruction sets, best first: (extra compiler flags, /proc/cpuinfo flags needed)
VARIANTS = {
    "avx512vnni": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"),
                   ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    "avx2": ((), ()),
}


def source_path(name: str) -> str:
    """A kernel source: inside the package in a wheel install, in the checkout's kernels/ when editable."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(here, "csrc", name), os.path.join(here, "..", "..", "kernels", name)):
        if os.path.isfile(path):
            return os.path.normpath(path)
    return os.path.join(here, "csrc", name)


def cache_dir() -> str:
    base = os.environ.get("HF_AUTOROUND_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hf_autoround"))
    return os.path.join(base, "kernels")


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split()[2:])
    except OSError:
        return set()


def cpu_unfit() -> str | None:
    """Why this CPU cannot run the AVX2 kernels, or None."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return f"CPU capability {cap} (needs AVX2)"
    flags = cpu_flags()
    missing = [c for c in CPU_FLAGS if flags and c not in flags]
    return f"CPU lacks {'/'.join(missing)}" if missing else None


def usable_variants() -> list[str]:
    """The ``VARIANTS`` this CPU can run, best first (``avx2`` always last)."""
    flags = cpu_flags()
    return [name for name, (_, needs) in VARIANTS.items() if all(n in flags for n in needs)]


def find_compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def _digest(source: str, flags: list[str]) -> str:
    """Hash of the flags, the source and the headers beside it (what the library is built from)."""
    h = hashlib.sha256(" ".join(flags).encode())
    folder = os.path.dirname(source)
    for path in [source] + sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".h")):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def build(source: str, compiler: str | None, variant: str = "avx2") -> str:
    """Path of the compiled shared library for ``source`` in instruction-set ``variant`` (compiled now unless
    cached); raises RuntimeError."""
    if not compiler:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = FLAGS + list(VARIANTS[variant][0])
    digest = _digest(source, flags)
    stem = os.path.splitext(os.path.basename(source))[0]
    target = os.path.join(cache_dir(), f"{stem}-{variant}-{digest}.so")
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir())
    os.close(fd)
    try:
        command = [compiler, *flags, "-I", os.path.dirname(source), source, "-o", tmp, "-lm"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            raise RuntimeError(f"compiling {source} failed: {proc.stderr.strip()[-500:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: str, compiler: str | None = None, variant: str = "avx2") -> ctypes.CDLL:
    """Check the CPU, compile ``source`` in ``variant`` if needed and load it; raises RuntimeError saying why it
    cannot."""
    reason = cpu_unfit()
    if reason is None and variant not in usable_variants():
        reason = f"CPU lacks what the {variant} build needs ({'/'.join(VARIANTS[variant][1])})"
    if reason:
        raise RuntimeError(reason)
    return ctypes.CDLL(build(source, compiler or find_compiler(), variant))
