"""Checkpoints written by the reference intel/auto-round 0.16.1 load through plain from_pretrained and match the
logits its own loader produced (its kernels compute in bf16/fp16: compare within that noise), and our fp32
dequantisation equals a direct dequantisation of the stored tensors exactly."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import FIXTURES
from hf_autoround.formats import get_layout
from hf_autoround.qdq import dequantize_weight
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.scheme import QuantScheme

from helpers import logits, rel_error

CASES = ["signround_auto_round", "rtn_w2g64_asym", "rtn_w4g32_asym"]
pytestmark = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason="../shared/fixtures not present")


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(FIXTURES, "expected_logits.pt"), weights_only=True)


@pytest.mark.parametrize("name", CASES)
def test_reference_checkpoint_matches_reference_logits(name, expected):
    model = AutoModelForCausalLM.from_pretrained(os.path.join(FIXTURES, name))
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    ours = logits(model, expected["input_ids"])
    ref = expected[name].float()
    assert rel_error(ours, ref) < 0.03
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97
    # and we are far closer to the reference's quantised model than the float model is
    assert rel_error(ours, ref) < 0.5 * rel_error(expected["float"].float(), ref)


@pytest.mark.parametrize("name", CASES)
def test_dequantisation_is_exact(name):
    path = os.path.join(FIXTURES, name)
    qc = json.load(open(os.path.join(path, "config.json")))["quantization_config"]
    scheme = QuantScheme(qc["bits"], qc["group_size"], qc["sym"])
    tensors = load_file(os.path.join(path, "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(path)
    layer = model.model.layers[1].mlp.down_proj
    prefix = "model.layers.1.mlp.down_proj."
    raw = {k: tensors[prefix + k] for k in ("qweight", "qzeros", "scales")}
    direct = dequantize_weight(get_layout(qc["packing_format"]).unpack(raw, 768, 256, scheme))
    assert torch.equal(dequantize_weight(layer.unpack()), direct)
    # independent check of the layout: a GPTQ-family code in row i sits at bits (i % (32/b))*b of word i*b/32
    if qc["packing_format"] != "auto_round:auto_awq" and 32 % scheme.bits == 0:
        per = 32 // scheme.bits
        word = raw["qweight"][5 // per, 3].item() & 0xFFFFFFFF
        code = (word >> ((5 % per) * scheme.bits)) & scheme.maxq
        assert code == layer.unpack().codes[5, 3].item()
