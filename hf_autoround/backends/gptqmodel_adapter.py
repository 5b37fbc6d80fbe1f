"""Optional kernels from gptqmodel (Marlin / ExLlamaV2 / Triton on CUDA, IPEX on CPU/XPU), used only when the
package is importable and the layer sits on the right device.

The adapter builds one gptqmodel ``QuantLinear`` per layer from our unpacked weight, re-packed in the GPTQ layout
that class expects (GPTQ v1 zero points, or raw zero points when the class says ``REQUIRES_FORMAT_V2``), then lets
the class repack for its kernel (``post_init``). The gptqmodel module is held by the kernel object, outside the
model's state dict, so our own buffers (the checkpoint layout) are what ``save_pretrained`` writes.

Not exercised by the CPU test suite (the package needs CUDA torch); tests skip when it is absent.
"""
from __future__ import annotations

import importlib

import torch

from ..formats.gptq import GPTQLayout


class GPTQModelKernel:
    name = "gptqmodel"
    qlinear = ""  # "module:Class" inside gptqmodel

    def __init__(self, layer):
        module_name, class_name = self.qlinear.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        qw = layer.unpack()
        scheme = qw.scheme
        device = layer.qweight.device
        zero_offset = 0 if getattr(cls, "REQUIRES_FORMAT_V2", False) else 1
        packed = GPTQLayout("gptqmodel", zero_offset=zero_offset).pack(qw)
        module = cls(bits=scheme.bits, group_size=scheme.group_size, desc_act=False, sym=scheme.sym,
                     in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None,
                     register_buffers=True)
        with torch.no_grad():
            for name, tensor in packed.items():
                setattr(module, name, torch.nn.Parameter(tensor.to(device), requires_grad=False)
                        if isinstance(getattr(module, name, None), torch.nn.Parameter) else tensor.to(device))
            if hasattr(module, "g_idx"):
                module.g_idx = qw.group_index().to(torch.int32).to(device)
            if layer.bias is not None:
                module.bias = layer.bias.detach().to(device=device, dtype=torch.float16)
        module.to(device)
        module.post_init()
        self.module = module.eval()
        self.layer = layer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class MarlinKernel(GPTQModelKernel):
    name = "gptqmodel_marlin"
    qlinear = "gptqmodel.nn_modules.qlinear.marlin:MarlinQuantLinear"


class ExllamaV2Kernel(GPTQModelKernel):
    name = "gptqmodel_exllamav2"
    qlinear = "gptqmodel.nn_modules.qlinear.exllamav2:ExllamaV2QuantLinear"


class TritonKernel(GPTQModelKernel):
    name = "gptqmodel_triton"
    qlinear = "gptqmodel.nn_modules.qlinear.tritonv2:TritonV2QuantLinear"


class IPEXKernel(GPTQModelKernel):
    name = "ipex"
    qlinear = "gptqmodel.nn_modules.qlinear.ipex:IPEXQuantLinear"
