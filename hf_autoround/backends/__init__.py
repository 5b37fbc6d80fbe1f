"""Kernel dispatch: a pure selection over the declarative table, plus the one impure step of attaching kernels.

``select_backend`` is a pure function of the layer's scheme, shape, device, dtype, packing format and the set of
backends whose requirements are met; ``available_backends`` is where imports are probed.

Backends (``table.BACKENDS``; "auto" takes the highest priority that fits each layer, and the log says why):

=================== ======= ========= =============================================================================
name                device  bits      what runs
=================== ======= ========= =============================================================================
ipex                cpu/xpu 4         gptqmodel's IPEX layer, only when intel-extension-for-pytorch imports
cpu_w4a8            cpu     2, 3, 4   our AVX2 kernel (``kernels/w4a8_avx2.c``, compiled on first use): 4-bit codes x
                                      int8 activations quantised per 32 inputs; the CPU default for these bits
                                      (faster decode than cpu_int4, +0.2 % perplexity on SmolLM2 W4G128);
                                      unavailable without a C compiler or AVX2/FMA/F16C, then cpu_int4 runs
cpu_int4            cpu     2, 3, 4   torch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations inside)
cpu_int8            cpu     8         ``_weight_int8pack_mm`` per channel; two int4-op passes when grouped
gptqmodel_*         cuda    2/4/8     Marlin, ExLlamaV2, Triton through gptqmodel, when it imports
torch               any     any       reference: dequantise per call, ``F.linear`` in the activation dtype
=================== ======= ========= =============================================================================

Activation dtypes: every CPU backend accepts float32, bfloat16 and float16 and returns the caller's dtype; none
ever computes in float16. cpu_int4/cpu_int8 round activations to bfloat16 inside torch's op (float32 accumulation);
cpu_w4a8 quantises them to int8 per block of 32 (``AutoRoundConfig(backend="cpu_int4")`` keeps bfloat16 ones).
``backend="torch"`` computes in the model dtype throughout.
Kernels keep their repacked data on the kernel object, so ``save_pretrained`` writes the checkpoint layout.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from collections import Counter

import torch

from .table import BACKENDS, BackendSpec

logger = logging.getLogger(__name__)


def _requirement_met(req: str) -> bool:
    if req.startswith("aten::"):
        return hasattr(torch.ops.aten, req.split("::", 1)[1])
    if req == "native::w4a8":
        from . import native

        return native.available()
    try:
        return importlib.util.find_spec(req) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(spec: BackendSpec) -> list[str]:
    return [r for r in spec.requires if not _requirement_met(r)]


def available_backends(table=BACKENDS) -> frozenset:
    return frozenset(b.name for b in table if not missing_requirements(b))


def select_backend(scheme, in_features, out_features, device, dtype, packing_format, available,
                   forced: str | None = None, table=BACKENDS) -> BackendSpec:
    """Choose the kernel for one layer. ``forced`` (a backend name, or None/"auto") must fit, or this raises."""
    device_type = torch.device(device).type
    args = (scheme, in_features, out_features, device_type, dtype, packing_format)
    if forced not in (None, "auto"):
        by_name = {b.name: b for b in table}
        if forced not in by_name:
            raise ValueError(f"backend={forced!r} is unknown; expected 'auto' or one of {sorted(by_name)}")
        spec = by_name[forced]
        fits = [b.name for b in sorted(table, key=lambda b: -b.priority)
                if b.name in available and b.reason_unfit(*args) is None]
        if forced not in available:
            needs = ", ".join(missing_requirements(spec) or spec.requires)
            if "native::w4a8" in needs:
                from . import native

                needs = needs.replace("native::w4a8", f"its compiled library; {native.why_unavailable()}")
            raise ValueError(f"backend={forced!r} is not available here (it needs {needs}); "
                             f"backends that can run {scheme.describe()} {in_features}x{out_features} on "
                             f"{device_type} in {dtype}: {fits}")
        reason = spec.reason_unfit(*args)
        if reason:
            raise ValueError(f"backend={forced!r} cannot run {scheme.describe()} {in_features}x{out_features} on "
                             f"{device_type} in {dtype} ({reason}); backends that can: {fits}")
        return spec
    candidates = [b for b in table if b.name in available and b.reason_unfit(*args) is None]
    if not candidates:
        raise ValueError(f"no backend can run {scheme.describe()} {in_features}x{out_features} on {device_type} "
                         f"in {dtype} with packing {packing_format}")
    return max(candidates, key=lambda b: b.priority)


def explain_choice(scheme, in_features, out_features, device, dtype, packing_format, available,
                   table=BACKENDS) -> str:
    """Why ``select_backend`` (automatic choice) picks its backend for this layer, in words: the chosen row's reason
    and, for every better-ranked row on this device, why it was passed over. Pure, like ``select_backend``."""
    device_type = torch.device(device).type
    args = (scheme, in_features, out_features, device_type, dtype, packing_format)
    passed = []
    for spec in sorted(table, key=lambda b: -b.priority):
        reason = "not available" if spec.name not in available else spec.reason_unfit(*args)
        if reason is None:
            why = f"highest priority ({spec.priority}) that fits: {spec.why or spec.note}"
            return why + (f"; passed over {'; '.join(passed)}" if passed else "")
        if device_type in spec.devices:
            passed.append(f"{spec.name} ({reason})")
    return "nothing fits"


def _kernel_class(spec: BackendSpec):
    module_name, class_name = spec.kernel.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def attach_kernels(model: torch.nn.Module, forced: str | None = None, dtype=None) -> Counter:
    """Give every QuantLinear of ``model`` its kernel; log and return which backend each kind of layer got.

    ``forced`` is ``AutoRoundConfig.backend`` ("auto"/None chooses per layer); ``dtype`` is the model's activation
    dtype. A forced backend that cannot run some layer raises before any kernel is attached, naming the layer.
    Returns ``Counter({(scheme description, backend name): n_layers})``.
    """
    from ..quant_linear import QuantLinear

    available = available_backends()
    plan = []
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        act_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.get_default_dtype())
        try:
            spec = select_backend(module.spec.scheme, module.in_features, module.out_features, module.qweight.device,
                                  act_dtype, module.spec.packing_format, available, forced)
        except ValueError as err:
            raise ValueError(f"layer {name}: {err}") from None
        plan.append((module, spec, act_dtype))
    chosen: Counter = Counter()
    dtypes: dict = {}
    reasons: dict = {}
    for module, spec, act_dtype in plan:
        module.kernel = _kernel_class(spec)(module)
        kind = module.spec.scheme.describe()
        chosen[(kind, spec.name)] += 1
        dtypes.setdefault(spec.name, set()).add(act_dtype)
        if (kind, spec.name) not in reasons:
            reasons[(kind, spec.name)] = (f"forced by backend={forced!r}" if forced not in (None, "auto") else
                                          explain_choice(module.spec.scheme, module.in_features, module.out_features,
                                                         module.qweight.device, act_dtype, module.spec.packing_format,
                                                         available))
    for (kind, backend), n in sorted(chosen.items()):
        logger.info("backend %s for %d %s layers: %s", backend, n, kind, reasons[(kind, backend)])
    if "cpu_w4a8" not in available and any(backend == "cpu_int4" for _, backend in chosen):
        from . import native

        logger.info("backend cpu_w4a8 not available: %s", native.why_unavailable())
    for backend in ("cpu_int4", "cpu_int8"):
        other = sorted(str(d).replace("torch.", "") for d in dtypes.get(backend, ()) if d != torch.bfloat16)
        if other:
            logger.info("backend %s: %s activations are rounded to bfloat16 inside the op (float32 accumulation, "
                        "output in %s); backend='torch' computes in the model dtype throughout",
                        backend, "/".join(other), "/".join(other))
    return chosen
