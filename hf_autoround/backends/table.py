"""The declarative table of kernels. Adding a backend = adding one row here and one kernel class.

A row says what a kernel can run (devices, bits, group sizes, symmetry, packing formats, activation dtypes), how
much we prefer it (priority, higher first; ``why`` says why, for the load log) and what it needs to be importable
(``requires``: module names, or ``torch.ops`` names written ``aten::op``, or ``native::w4a8`` for our compiled
kernel). ``kernel`` is ``"module:Class"``, imported only when chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .cpu_aten import int4_op_unfit, int8_unfit
from .native import w4a8_unfit

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
    shape_rule: Callable | None = None  # (scheme, in_features, out_features) -> reason it cannot, or None
    note: str = ""
    why: str = ""  # why it ranks where it does, for the log when it is chosen automatically

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
        if self.shape_rule is not None:
            return self.shape_rule(scheme, in_features, out_features)
        return None


CPU = frozenset({"cpu"})
CUDA = frozenset({"cuda"})
HALF_DTYPES = frozenset({torch.float16, torch.bfloat16})
BOTH = frozenset({True, False})
ATEN_INT4 = ("aten::_convert_weight_to_int4pack_for_cpu", "aten::_weight_int4pack_mm_for_cpu")

BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        name="torch",
        devices=frozenset({"cpu", "cuda", "xpu", "mps", "hpu"}),
        bits=frozenset({2, 3, 4, 8}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=FLOAT_DTYPES,
        priority=0,
        kernel="hf_autoround.backends.torch_ref:TorchReferenceKernel",
        note="plain-torch reference: unpack, dequantise, F.linear (in the activation dtype, per call)",
    ),
    BackendSpec(
        name="cpu_int4",
        devices=CPU,
        bits=frozenset({2, 3, 4}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=FLOAT_DTYPES,
        priority=50,
        kernel="hf_autoround.backends.cpu_aten:AtenInt4Kernel",
        requires=ATEN_INT4,
        shape_rule=int4_op_unfit,
        note="torch's int4 weight-only op, repacked at load; bf16 activations inside, caller's dtype outside",
        why="torch's int4 weight-only op (bfloat16 activations), for what cpu_w4a8 cannot run or where it is "
            "unavailable",
    ),
    BackendSpec(
        name="cpu_w4a8",
        devices=CPU,
        bits=frozenset({2, 3, 4}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=FLOAT_DTYPES,
        priority=52,
        kernel="hf_autoround.backends.native:W4A8Kernel",
        requires=("native::w4a8",),
        shape_rule=w4a8_unfit,
        note="our AVX2 kernel: 4-bit codes x int8 activations (per 32 inputs), compiled on first use",
        why="our AVX2 kernel, 4-bit codes x int8 activations per 32 inputs: decodes faster than cpu_int4 "
            "(benchmarks/kernels.py) for +0.2 % perplexity on SmolLM2-135M W4G128 (benchmarks/kernel_accuracy.py); "
            "backend='cpu_int4' keeps bfloat16 activations",
    ),
    BackendSpec(
        name="cpu_int8",
        devices=CPU,
        bits=frozenset({8}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=FLOAT_DTYPES,
        priority=50,
        kernel="hf_autoround.backends.cpu_aten:AtenInt8Kernel",
        requires=("aten::_weight_int8pack_mm",) + ATEN_INT4,
        shape_rule=int8_unfit,
        note="per channel: torch's int8 weight-only op; grouped: two int4-op passes (high and low nibble)",
    ),
    # Optional, chosen automatically when importable (gptqmodel needs CUDA torch; IPEX needs its matching torch).
    BackendSpec(
        name="gptqmodel_marlin",
        devices=CUDA,
        bits=frozenset({4, 8}),
        group_sizes=frozenset({-1, 32, 64, 128}),
        sym=frozenset({True}),
        packing_formats=ANY,
        dtypes=HALF_DTYPES,
        priority=100,
        kernel="hf_autoround.backends.gptqmodel_adapter:MarlinKernel",
        requires=("gptqmodel",),
        min_out_multiple=64,
        note="gptqmodel's Marlin CUDA kernel",
    ),
    BackendSpec(
        name="gptqmodel_exllamav2",
        devices=CUDA,
        bits=frozenset({4}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=frozenset({torch.float16}),
        priority=90,
        kernel="hf_autoround.backends.gptqmodel_adapter:ExllamaV2Kernel",
        requires=("gptqmodel",),
        min_out_multiple=32,
        note="gptqmodel's ExLlamaV2 CUDA kernel",
    ),
    BackendSpec(
        name="gptqmodel_triton",
        devices=CUDA,
        bits=frozenset({2, 4, 8}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=HALF_DTYPES,
        priority=80,
        kernel="hf_autoround.backends.gptqmodel_adapter:TritonKernel",
        requires=("gptqmodel", "triton"),
        min_out_multiple=32,
        note="gptqmodel's Triton kernel",
    ),
    BackendSpec(
        name="ipex",
        devices=frozenset({"cpu", "xpu"}),
        bits=frozenset({4}),
        group_sizes=ANY,
        sym=BOTH,
        packing_formats=ANY,
        dtypes=HALF_DTYPES,
        priority=55,
        kernel="hf_autoround.backends.gptqmodel_adapter:IPEXKernel",
        requires=("gptqmodel", "intel_extension_for_pytorch"),
        min_out_multiple=32,
        note="gptqmodel's IPEX layer (intel-extension-for-pytorch)",
    ),
)
