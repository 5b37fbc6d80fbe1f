"""Kernel dispatch: a pure selection over the declarative table, plus the one impure step of attaching kernels.

``select_backend`` is a pure function of the layer's scheme, shape, device, dtype, packing format and the set of
backends whose requirements are met; ``available_backends`` is where imports are probed.
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter

import torch

from .table import BACKENDS, BackendSpec

logger = logging.getLogger(__name__)


def _requirement_met(req: str) -> bool:
    if req.startswith("aten::"):
        return hasattr(torch.ops.aten, req.split("::", 1)[1])
    return importlib.util.find_spec(req) is not None


def available_backends(table=BACKENDS) -> frozenset:
    return frozenset(b.name for b in table if all(_requirement_met(r) for r in b.requires))


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
        if forced not in available:
            raise ValueError(f"backend={forced!r} is not available here (needs {', '.join(spec.requires)})")
        reason = spec.reason_unfit(*args)
        if reason:
            fits = [b.name for b in table if b.name in available and b.reason_unfit(*args) is None]
            raise ValueError(f"backend={forced!r} cannot run this layer ({reason}); backends that can: {fits}")
        return spec
    candidates = [b for b in table if b.name in available and b.reason_unfit(*args) is None]
    if not candidates:
        raise ValueError(f"no backend can run {scheme.describe()} {in_features}x{out_features} on {device_type} "
                         f"in {dtype} with packing {packing_format}")
    return max(candidates, key=lambda b: b.priority)


def _kernel_class(spec: BackendSpec):
    module_name, class_name = spec.kernel.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def attach_kernels(model: torch.nn.Module, forced: str | None = None, dtype=None) -> Counter:
    """Give every QuantLinear of ``model`` its kernel; log and return which backend each kind of layer got."""
    from ..quant_linear import QuantLinear

    available = available_backends()
    chosen: Counter = Counter()
    for module in model.modules():
        if not isinstance(module, QuantLinear):
            continue
        act_dtype = dtype or (module.bias.dtype if module.bias is not None else torch.get_default_dtype())
        spec = select_backend(module.spec.scheme, module.in_features, module.out_features, module.qweight.device,
                              act_dtype, module.spec.packing_format, available, forced)
        module.kernel = _kernel_class(spec)(module)
        chosen[(module.spec.scheme.describe(), spec.name)] += 1
    for (kind, backend), n in sorted(chosen.items()):
        logger.info("backend %s for %d %s layers", backend, n, kind)
    return chosen
