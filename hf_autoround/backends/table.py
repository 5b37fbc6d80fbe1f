"""The declarative table of kernels. Adding a backend = adding one row here and one kernel class.

A row says what a kernel can run (devices, bits, group sizes, symmetry, packing formats, activation dtypes), how
much we prefer it (priority, higher first) and what it needs to be importable (``requires``: module names, or
``torch.ops`` names written ``aten::op``). ``kernel`` is ``"module:Class"``, imported only when chosen.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

ANY = None
FLOAT_DTYPES = frozenset({torch.float32, torch.bfloat16, torch.float16})


@dataclass(frozen=True)
class BackendSpec:
    name: str
    devices: frozenset
    bits: frozenset
    group_sizes: frozenset | None  # None: any group size
    sym: frozenset
    packing_formats: frozenset | None  # None: any format
    dtypes: frozenset
    priority: int
    kernel: str
    requires: tuple = ()
    min_out_multiple: int = 1  # output features must be a multiple of this
    note: str = ""

    def reason_unfit(self, scheme, in_features, out_features, device_type, dtype, packing_format) -> str | None:
        """None when this backend can run the layer, else a short reason."""
        checks = (
            (device_type in self.devices, f"device {device_type} not in {sorted(self.devices)}"),
            (scheme.bits in self.bits, f"{scheme.bits}-bit not in {sorted(self.bits)}"),
            (self.group_sizes is None or scheme.group_size in self.group_sizes,
             f"group_size {scheme.group_size} not in {sorted(self.group_sizes or ())}"),
            (scheme.sym in self.sym, "asymmetric" if not scheme.sym else "symmetric"),
            (self.packing_formats is None or packing_format in self.packing_formats,
             f"packing format {packing_format}"),
            (dtype in self.dtypes, f"dtype {dtype}"),
            (out_features % self.min_out_multiple == 0, f"out_features not a multiple of {self.min_out_multiple}"),
        )
        for ok, reason in checks:
            if not ok:
                return reason
        return None


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        name="torch",
        devices=frozenset({"cpu", "cuda", "xpu", "mps", "hpu"}),
        bits=frozenset({2, 3, 4, 8}),
        group_sizes=ANY,
        sym=frozenset({True, False}),
        packing_formats=ANY,
        dtypes=FLOAT_DTYPES,
        priority=0,
        kernel="hf_autoround.backends.torch_ref:TorchReferenceKernel",
        note="plain-torch reference: unpack, dequantise, F.linear",
    ),
)
