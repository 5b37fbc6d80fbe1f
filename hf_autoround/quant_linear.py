"""``QuantLinear``: a linear layer holding packed integer weights as persistent buffers.

The buffers are exactly the checkpoint tensors of its packing format (``qweight``, ``qzeros``, ``scales``, plus
``bias``), so ``state_dict`` / ``save_pretrained`` always write the original layout. How the product is computed is
the job of a *kernel* chosen by :mod:`hf_autoround.backends`; a kernel may build derived, repacked data of its own,
which is never part of the state dict.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .formats import canonical_format, get_layout
from .scheme import QuantizedWeight, QuantScheme


@dataclass(frozen=True)
class LinearQuantSpec:
    in_features: int
    out_features: int
    scheme: QuantScheme
    packing_format: str

    @property
    def layout(self):
        return get_layout(self.packing_format)


class QuantLinear(nn.Module):
    def __init__(self, spec: LinearQuantSpec, bias: bool, dtype=None, device=None):
        super().__init__()
        self.spec = LinearQuantSpec(spec.in_features, spec.out_features, spec.scheme,
                                    canonical_format(spec.packing_format))
        self.in_features, self.out_features = spec.in_features, spec.out_features
        for name, (shape, buf_dtype) in self.spec.layout.tensor_specs(
                spec.in_features, spec.out_features, spec.scheme).items():
            self.register_buffer(name, torch.zeros(shape, dtype=buf_dtype, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.kernel = None  # set by backends.attach_kernel; the reference kernel is used until then

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, packing_format: str, bias: torch.Tensor | None = None):
        spec = LinearQuantSpec(qw.in_features, qw.out_features, qw.scheme, packing_format)
        dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(spec, bias=bias is not None, dtype=dtype, device=qw.codes.device)
        for name, tensor in spec.layout.pack(qw).items():
            getattr(layer, name).copy_(tensor)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer

    def packed_tensors(self) -> dict:
        names = self.spec.layout.tensor_specs(self.in_features, self.out_features, self.spec.scheme)
        return {name: getattr(self, name) for name in names}

    def unpack(self) -> QuantizedWeight:
        return self.spec.layout.unpack(self.packed_tensors(), self.in_features, self.out_features, self.spec.scheme)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is None:
            from .backends.torch_ref import TorchReferenceKernel

            self.kernel = TorchReferenceKernel(self)
        return self.kernel(x)

    def extra_repr(self) -> str:
        backend = getattr(self.kernel, "name", "unset")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.scheme.describe()}, "
                f"packing={self.spec.packing_format}, backend={backend}, bias={self.bias is not None}")
