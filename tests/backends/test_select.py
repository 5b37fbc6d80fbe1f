"""``select_backend`` is a pure function of the layer and the set of available backends."""
from __future__ import annotations

import pytest
import torch

from hf_autoround.backends import BACKENDS, available_backends, explain_choice, select_backend
from hf_autoround.scheme import QuantScheme

ALL = frozenset(b.name for b in BACKENDS)
CPU_ALL = ALL - {"ipex"}
FMT = "auto_round:auto_gptq"


def pick(bits=4, group=128, sym=True, shape=(4096, 4096), device="cpu", dtype=torch.bfloat16, available=ALL,
         forced=None):
    return select_backend(QuantScheme(bits, group, sym), *shape, device, dtype, FMT, available, forced).name


def test_names_are_unique():
    assert len({b.name for b in BACKENDS}) == len(BACKENDS)


@pytest.mark.parametrize("bits,expected", [(2, "cpu_w4a8"), (3, "cpu_w4a8"), (4, "cpu_w4a8"), (8, "cpu_int8")])
def test_cpu_choices(bits, expected):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert pick(bits, dtype=dtype, available=CPU_ALL) == expected
        assert pick(bits, dtype=dtype, available=CPU_ALL - {"cpu_w4a8"}) == expected.replace("cpu_w4a8", "cpu_int4")


def test_fallbacks_to_reference():
    assert pick(available=frozenset({"torch"})) == "torch"
    assert pick(shape=(4096, 40), available=CPU_ALL) == "torch"  # out_features not a multiple of 16
    assert pick(group=48, shape=(96, 64), available=CPU_ALL) == "torch"  # no op group divides 96 and 48
    assert pick(bits=8, group=-1, shape=(100, 64), available=CPU_ALL) == "torch"  # int8 op: in_features % 8
    assert pick(available=ALL - {"cpu_w4a8"}) == "ipex"  # preferred over the aten op when importable


def test_cuda_prefers_gptqmodel_when_present():
    assert pick(device="cuda", dtype=torch.float16) == "gptqmodel_marlin"
    assert pick(device="cuda", dtype=torch.float16, sym=False) == "gptqmodel_exllamav2"
    assert pick(device="cuda", dtype=torch.float16, available=frozenset({"torch"})) == "torch"


def test_forced_errors_name_the_reason_and_alternatives():
    with pytest.raises(ValueError, match=r"unknown; expected 'auto' or one of"):
        pick(forced="marlin2")
    with pytest.raises(ValueError, match=r"not available here.*backends that can run.*\['torch'\]"):
        pick(forced="cpu_int4", available=frozenset({"torch"}))
    with pytest.raises(ValueError, match=r"device cpu not in \['cuda'\]"):
        pick(forced="gptqmodel_marlin")
    assert pick(forced="torch") == "torch" and pick(forced="auto", available=CPU_ALL) == "cpu_w4a8"


def test_native_kernel_is_the_default_and_cpu_int4_its_fallback():
    assert pick(available=ALL - {"ipex"}) == "cpu_w4a8"
    assert pick(available=ALL - {"ipex", "cpu_w4a8"}) == "cpu_int4"
    assert pick(forced="cpu_int4", available=CPU_ALL) == "cpu_int4"  # the way to keep bfloat16 activations
    assert pick(available=ALL) == "ipex"  # IPEX, when it imports, still ranks first on CPU
    assert "cpu_w4a8 (not available)" in explain(available=CPU_ALL - {"cpu_w4a8"})


def explain(shape=(4096, 4096), available=CPU_ALL, bits=4):
    return explain_choice(QuantScheme(bits, 128, True), *shape, "cpu", torch.bfloat16, FMT, available)


def test_explanation_names_the_rule_and_what_was_passed_over():
    chosen = pick(available=CPU_ALL)
    spec = next(b for b in BACKENDS if b.name == chosen)
    assert explain().startswith(f"highest priority ({spec.priority}) that fits: {spec.why or spec.note}")
    assert "ipex (not available)" in explain()
    assert "gptqmodel" not in explain()  # CUDA rows are not mentioned on CPU
    narrow = explain(shape=(4096, 40))
    assert narrow.startswith("highest priority (0) that fits") and "out_features 40 is not a multiple of 16" in narrow
    assert "cpu_int8 (4-bit not in [8])" in narrow
    assert explain(available=frozenset()) == "nothing fits"


def test_this_machine_has_the_cpu_kernels():
    assert {"torch", "cpu_int4", "cpu_int8"} <= available_backends()


@pytest.mark.skipif(not torch.cuda.is_available() or "gptqmodel_marlin" not in available_backends(),
                    reason="needs CUDA and gptqmodel")
def test_gptqmodel_marlin_matches_reference():
    from hf_autoround.backends.gptqmodel_adapter import MarlinKernel
    from hf_autoround.backends.torch_ref import TorchReferenceKernel
    from hf_autoround.qdq import quantize_weight
    from hf_autoround.quant_linear import QuantLinear

    qw = quantize_weight(torch.randn(256, 512) * 0.05, QuantScheme(4, 128, True))
    layer = QuantLinear.from_quantized(qw, FMT).cuda()
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    ref = TorchReferenceKernel(layer)(x.float())
    y = MarlinKernel(layer)(x)
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2
