"""Checks a checkpoint's tensors against the layer plan *before* any weight is loaded.

transformers fills missing tensors with uninitialised memory and only warns, so a quantised checkpoint with a
missing or mis-shaped tensor would otherwise load as garbage. We read the safetensors headers (shapes and dtypes
only, no data except a ``g_idx`` to check it) and raise with the tensor's name on any disagreement.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from .formats import get_layout
from .layers import LayerPlan

_INT_DTYPES = {"I32", "U32", "I64"}


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: str  # safetensors dtype string, e.g. "I32", "F16"
    file: str


def read_headers(files) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    for path in files or ():
        path = str(path)
        if not path.endswith(".safetensors"):
            raise ValueError(f"{path}: quantized checkpoints are read from safetensors only (no pickle is loaded)")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    infos[key] = TensorInfo(tuple(sl.get_shape()), sl.get_dtype(), path)
        except Exception as err:  # safetensors raises its own error type for truncated or garbled files
            raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
    return infos


class CheckpointMismatch(ValueError):
    pass


def _expect(cond: bool, msg: str):
    if not cond:
        raise CheckpointMismatch(msg)


def _check_g_idx(name: str, info: TensorInfo, in_features: int, group_len: int) -> None:
    _expect(info.shape == (in_features,), f"{name}: shape {info.shape}, expected ({in_features},)")
    with safe_open(info.file, framework="pt", device="cpu") as f:
        g_idx = f.get_tensor(name).to("cpu")
    trivial = torch.arange(in_features, device="cpu") // group_len  # explicit: this runs under a meta device context
    _expect(torch.equal(g_idx.to(torch.int64), trivial),
            f"{name}: act-order (desc_act) group indices are not supported; expected i // {group_len}")


def _find(infos: dict, key: str, prefix: str):
    """The checkpoint entry for a model key, tolerating a saved base model (no ``prefix.``) or the reverse."""
    for candidate in (key, key.removeprefix(prefix + "."), f"{prefix}.{key}"):
        if candidate in infos:
            return infos[candidate]
    return None


def validate_other_tensors(model, infos: dict[str, TensorInfo], quantized: set) -> None:
    """Every other tensor the model expects is present (tied copies excepted), float where the model is float,
    and of the model's shape: transformers would otherwise fill a missing one with random values."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    for key, tensor in model.state_dict().items():
        if key.rsplit(".", 1)[0] in quantized or key in tied:
            continue
        info = _find(infos, key, prefix)
        _expect(info is not None, f"{key} is missing from the checkpoint")
        if tensor.is_floating_point():
            _expect(info.dtype.startswith(("F", "BF")), f"{key}: dtype {info.dtype}, expected a float tensor")
        _expect(info.shape == tuple(tensor.shape), f"{key}: shape {info.shape}, expected {tuple(tensor.shape)}")


def validate_against_plan(plan: LayerPlan, infos: dict[str, TensorInfo], model) -> None:
    """Raise CheckpointMismatch naming the first tensor that contradicts the plan."""
    if not infos:
        return
    layout = get_layout(plan.packing_format)
    for name, scheme in plan.quantized.items():
        linear = model.get_submodule(name)
        specs = layout.tensor_specs(linear.in_features, linear.out_features, scheme)
        for suffix, (shape, _) in specs.items():
            key = f"{name}.{suffix}"
            if suffix == "g_idx" and key not in infos:
                continue
            _expect(key in infos, f"{key} is missing from the checkpoint (expected {scheme.describe()}, "
                                  f"packing {plan.packing_format})")
            got = infos[key]
            _expect(got.shape == tuple(shape),
                    f"{key}: shape {got.shape} contradicts {scheme.describe()} {linear.in_features}x"
                    f"{linear.out_features} in {plan.packing_format} (expected {tuple(shape)})")
            if suffix in ("qweight", "qzeros"):
                _expect(got.dtype in _INT_DTYPES, f"{key}: dtype {got.dtype}, expected an int32 tensor")
            else:
                _expect(got.dtype.startswith(("F", "BF")), f"{key}: dtype {got.dtype}, expected a float tensor")
        if f"{name}.g_idx" in infos:
            _check_g_idx(f"{name}.g_idx", infos[f"{name}.g_idx"], linear.in_features,
                         scheme.group_len(linear.in_features))
        _expect(f"{name}.weight" not in infos, f"{name}.weight is in the checkpoint but the config says the layer "
                                               f"is quantized")
    for name in plan.kept_float:
        _expect(f"{name}.qweight" not in infos, f"{name}.qweight is in the checkpoint but the config keeps "
                                                f"{name} in float ({plan.kept_float[name]})")
    stray = sorted(k[: -len(".qweight")] for k in infos if k.endswith(".qweight")
                   and k[: -len(".qweight")] not in plan.quantized)
    _expect(not stray, f"{stray[0]}.qweight is in the checkpoint but the config does not quantize {stray[0]}"
            if stray else "")
    validate_other_tensors(model, infos, set(plan.quantized))


def validate_loaded_zero_points(model) -> None:
    """After loading: a layer the config calls symmetric must hold the symmetric zero point everywhere. The tensor
    shapes cannot tell sym from asym (both store qzeros), and fast kernels trust the scheme."""
    from .quant_linear import QuantLinear

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.spec.scheme.sym:
            zeros = module.unpack().zeros
            expected = 2 ** (module.spec.scheme.bits - 1)
            _expect(bool((zeros == expected).all()),
                    f"{name}.qzeros: the config says sym=True but the zero points are not all {expected} "
                    f"(found {int(zeros.min())}..{int(zeros.max())}); the checkpoint is asymmetric or its "
                    f"packing_format is not {module.spec.packing_format}")
