"""Packed layers of finished blocks, one safetensors file per block.

Resumable tuning keeps these files so that a restarted run can put finished blocks back exactly; the low-memory
mode writes a tuned block here and drops it from memory, and its checkpoint writer reads the tensors back one at a
time. A block's file holds each ``QuantLinear``'s state (``<layer>.qweight``, ``.qzeros``, ``.scales``, ``.bias``,
names relative to the block) and, in its metadata, what rebuilds the layer (shape, scheme, packing, bias dtype);
also the block's float tensors that tuning rewrote (the norm weights channel scaling divides), under their own
names, so that a restored or streamed block holds those and not the checkpoint's originals.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..convert import set_submodule
from ..quant_linear import LinearQuantSpec, QuantLinear
from ..safetensors_io import TensorEntry, atomic_write, read_header, read_tensor, write_tensors
from ..scheme import QuantScheme
from .weight_source import assign_tensor

_META_KEY = "hf_autoround.layers"
_FLOATS_KEY = "hf_autoround.floats"


@dataclass(frozen=True)
class LayerRecord:
    """What rebuilds one packed layer (its tensors come from the block file)."""

    in_features: int
    out_features: int
    bits: int
    group_size: int
    sym: bool
    packing_format: str
    bias_dtype: str | None  # None: no bias

    @classmethod
    def of(cls, layer: QuantLinear) -> "LayerRecord":
        s = layer.spec
        bias = None if layer.bias is None else str(layer.bias.dtype).removeprefix("torch.")
        return cls(s.in_features, s.out_features, s.scheme.bits, s.scheme.group_size, s.scheme.sym,
                   s.packing_format, bias)

    def build(self, device) -> QuantLinear:
        spec = LinearQuantSpec(self.in_features, self.out_features, QuantScheme(self.bits, self.group_size, self.sym),
                               self.packing_format)
        dtype = getattr(torch, self.bias_dtype) if self.bias_dtype else None
        return QuantLinear(spec, bias=self.bias_dtype is not None, dtype=dtype, device=device)


class BlockStore:
    """``block-<prefix>.safetensors`` files in ``directory``."""

    def __init__(self, directory: str):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)

    def path(self, prefix: str) -> str:
        return os.path.join(self.directory, f"block-{prefix}.safetensors")

    def has(self, prefix: str) -> bool:
        return os.path.isfile(self.path(prefix))

    def save(self, prefix: str, block: nn.Module, names, floats=()) -> None:
        """Write the packed layers ``names`` and the float tensors ``floats`` (keys; all relative to ``block``) of
        a finished block, atomically."""
        records, entries = {}, [TensorEntry.of(key, block.get_parameter(key).detach()) for key in floats]
        for name in names:
            layer = block.get_submodule(name)
            if not isinstance(layer, QuantLinear):
                raise TypeError(f"{prefix}.{name}: a finished block holds a {type(layer).__name__} here, not a "
                                f"packed QuantLinear; it cannot be stored for resuming or low-memory tuning")
            records[name] = asdict(LayerRecord.of(layer))
            entries += [TensorEntry.of(f"{name}.{key}", t) for key, t in layer.state_dict().items()]
        metadata = {_META_KEY: json.dumps(records, sort_keys=True), _FLOATS_KEY: json.dumps(sorted(floats))}
        atomic_write(self.path(prefix), lambda tmp: write_tensors(tmp, entries, metadata))

    def floats(self, prefix: str) -> list[str]:
        """Keys of the rewritten float tensors in the block's file."""
        return json.loads(read_header(self.path(prefix))[1].get(_FLOATS_KEY, "[]"))

    def records(self, prefix: str) -> dict[str, LayerRecord]:
        _, metadata = read_header(self.path(prefix))
        return {name: LayerRecord(**r) for name, r in json.loads(metadata[_META_KEY]).items()}

    def tensors(self, prefix: str) -> dict:
        """Tensor name (relative to the block) -> StoredTensor, for reading one at a time."""
        return read_header(self.path(prefix))[0]

    def install(self, block: nn.Module, prefix: str, on_meta: bool = False) -> list[str]:
        """Put the stored packed layers and rewritten float tensors into ``block`` (in place of whatever is there);
        ``on_meta``: packed layers as shapes only, every tensor stays in the file. Returns the layer names."""
        records = self.records(prefix)
        stored = self.tensors(prefix)
        with open(self.path(prefix), "rb") as f:
            for name, record in records.items():
                layer = record.build("meta")
                if not on_meta:
                    state = {key: read_tensor(stored[f"{name}.{key}"], f) for key in layer.state_dict()}
                    _check_like(f"{prefix}.{name}", layer.state_dict(), state)
                    layer.load_state_dict(state, assign=True)
                set_submodule(block, name, layer)
            if not on_meta:
                for key in self.floats(prefix):
                    assign_tensor(block, key, read_tensor(stored[key], f))
        return list(records)


def _check_like(name: str, expected: dict, got: dict) -> None:
    for key, t in expected.items():
        if got[key].dtype != t.dtype or got[key].shape != t.shape:
            raise ValueError(f"{name}.{key}: stored as {got[key].dtype} {list(got[key].shape)}, expected "
                             f"{t.dtype} {list(t.shape)}")
