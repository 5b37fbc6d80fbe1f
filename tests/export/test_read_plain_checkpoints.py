"""Plain ``quant_method: "gptq"`` / ``"awq"`` checkpoints load through
``from_pretrained(dir, quantization_config=AutoRoundConfig())`` as our QuantLinear, with no extra package.

Besides our own exports (test_export_gptq_awq), the tensors written by the reference intel/auto-round in
``../shared/fixtures`` are re-labelled as plain GPTQ (v1: its ``auto_round:auto_gptq`` packing is GPTQ's) and plain
AWQ (its ``auto_round:auto_awq`` packing is AWQ GEMM's), with no ``block_name_to_quantize`` (blocks auto-detected).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import FIXTURES

from hf_autoround import AutoRoundConfig
from hf_autoround.config import foreign_to_native
from hf_autoround.quant_linear import QuantLinear

pytestmark = pytest.mark.skipif(not os.path.isdir(FIXTURES), reason="../shared/fixtures not present")

PLAIN = {
    "signround_auto_round": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
                             "checkpoint_format": "gptq", "true_sequential": True, "damp_percent": 0.01},
    "rtn_w4g32_asym": {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
                       "modules_to_not_convert": None},
}


def _load(path, **cfg):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend="torch", **cfg),
                                                 dtype=torch.float32)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14, "not loaded as quantized"
    return model.eval()


def _relabel(tmp_path, name) -> str:
    out = tmp_path / name
    shutil.copytree(os.path.join(FIXTURES, name), out)
    (out / "quantization_config.json").unlink()
    with open(out / "config.json") as f:
        config = json.load(f)
    config["quantization_config"] = PLAIN[name]
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    return str(out)


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_reference_tensors_as_plain_checkpoint(tmp_path, name):
    expected = torch.load(os.path.join(FIXTURES, "expected_logits.pt"), weights_only=True)
    ids = expected["input_ids"]
    plain = _load(_relabel(tmp_path, name))
    native = _load(os.path.join(FIXTURES, name))
    layer = plain.model.layers[0].self_attn.q_proj
    assert layer.spec.scheme.sym == PLAIN[name].get("sym", not PLAIN[name].get("zero_point", False))
    with torch.no_grad():
        ours = plain(ids).logits
        assert torch.equal(ours, native(ids).logits)
    ref = expected[name].float()
    assert ((ours - ref).norm() / ref.norm()).item() < 0.03
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_awq_zero_point_means_asym():
    d = foreign_to_native({"quant_method": "awq", "w_bit": 4, "q_group_size": 64, "zero_point": True,
                           "version": "gemm", "modules_to_not_convert": ["visual"]})
    assert (d["bits"], d["group_size"], d["sym"], d["packing_format"]) == (4, 64, False, "auto_round:awq")
    assert d["extra_config"] == {"visual": {"bits": 16}}
    cfg = AutoRoundConfig.from_dict({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False,
                                     "version": "gemm"})
    assert cfg.sym is True and cfg.resolved_packing_format == "auto_round:auto_awq"


def test_gptq_keys_mapped():
    cfg = AutoRoundConfig.from_dict({"quant_method": "gptq", "bits": 3, "group_size": 64, "sym": False,
                                     "desc_act": False, "lm_head": False, "checkpoint_format": "gptq_v2"})
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.quant_lm_head) == (3, 64, False, False)
    assert cfg.resolved_packing_format == "auto_round"  # v2 stores raw zero points
    v1 = AutoRoundConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})
    assert v1.resolved_packing_format == "auto_round:auto_gptq"


@pytest.mark.parametrize("bad,match", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": True}, "desc_act"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"}, "gemm"),
])
def test_unsupported_variants_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        foreign_to_native(bad)
