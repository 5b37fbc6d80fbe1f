"""auto_gptq / auto_awq / native exports of one in-memory model, reloaded through our loader: logits equal."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open

from conftest import build_tiny_model

from hf_autoround import AutoRoundConfig
from hf_autoround.export import export_model
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.quantize import quantize_model


def _quantized_tiny(arch: str, **cfg):
    """An RTN-quantized tiny model computing with the plain-torch kernel (as the reloads below do)."""
    from hf_autoround.backends import attach_kernels

    model = build_tiny_model(arch)
    quantize_model(model, AutoRoundConfig(iters=0, **cfg), progress=False)
    attach_kernels(model, forced="torch")
    return model


def _n_quant(model) -> int:
    return sum(isinstance(m, QuantLinear) for m in model.modules())


def _reload(path: str, like):
    """Through from_pretrained with the plain-torch kernel, so logits can be compared exactly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend="torch"),
                                                 dtype=torch.float32)
    assert _n_quant(model) == _n_quant(like) > 0, "not every quantized layer came back as one"
    return model.eval()


def _qconfig(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)["quantization_config"]


@pytest.mark.parametrize("arch,bits,sym", [("llama", 4, True), ("qwen2", 4, True), ("opt", 4, True), ("llama", 2, True),
                                           ("opt", 3, True), ("llama", 8, True), ("qwen2", 4, False)])
def test_auto_gptq_roundtrip(tmp_path, arch, bits, sym, token_batch):
    model = _quantized_tiny(arch, bits=bits, group_size=32, sym=sym)
    out = str(tmp_path / "gptq")
    export_model(model, None, out, "auto_gptq")
    q = _qconfig(out)
    assert q["quant_method"] == "gptq" and q["desc_act"] is False and q["bits"] == bits and q["sym"] == sym
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = next(k for k in keys if k.endswith("q_proj.qzeros"))
        g_idx = f.get_tensor(name.replace("qzeros", "g_idx"))
        if sym and bits == 4:  # zero point 8 stored minus one
            assert int(f.get_tensor(name)[0, 0]) == 0x77777777
    assert torch.equal(g_idx.long(), torch.arange(g_idx.numel()) // 32)
    reloaded = _reload(out, model)
    with torch.no_grad():
        assert torch.equal(reloaded(token_batch).logits, model(token_batch).logits)


@pytest.mark.parametrize("sym", [True, False])
def test_auto_awq_roundtrip(tmp_path, sym, token_batch):
    model = _quantized_tiny("llama", bits=4, group_size=32, sym=sym)
    out = str(tmp_path / "awq")
    export_model(model, None, out, "auto_awq")
    q = _qconfig(out)
    assert q["quant_method"] == "awq" and q["version"] == "gemm" and q["zero_point"] is (not sym)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        qweight = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
    assert qweight.shape == (64, 64 // 8)  # AWQ packs along out
    reloaded = _reload(out, model)
    with torch.no_grad():
        assert torch.equal(reloaded(token_batch).logits, model(token_batch).logits)


@pytest.mark.parametrize("fmt", ["auto_round", "auto_round:auto_gptq", "auto_round:auto_awq", "auto_round:gptqmodel"])
def test_native_variants_convert_packing(tmp_path, fmt, token_batch):
    model = _quantized_tiny("llama", bits=4, group_size=32, sym=False)  # held as auto_round (raw zero points)
    out = str(tmp_path / "native")
    export_model(model, None, out, fmt)
    q = _qconfig(out)
    assert q["quant_method"] == "auto-round"
    expected = {"auto_round": "auto_round", "auto_round:gptqmodel": "auto_round"}.get(fmt, fmt)
    assert q["packing_format"] == expected
    reloaded = _reload(out, model)
    with torch.no_grad():
        assert torch.equal(reloaded(token_batch).logits, model(token_batch).logits)


def test_several_formats_from_one_model(tmp_path, token_batch):
    model = _quantized_tiny("llama", bits=4, group_size=32, sym=True)
    targets = export_model(model, None, str(tmp_path / "all"), "auto_round,auto_gptq,auto_awq")
    assert sorted(os.path.basename(p) for p in targets.values()) == ["auto_awq", "auto_gptq", "auto_round"]
    with torch.no_grad():
        expected = model(token_batch).logits
        for path in targets.values():
            assert torch.equal(_reload(path, model)(token_batch).logits, expected)


def test_asym_gptq_warns(tmp_path, caplog):
    model = _quantized_tiny("llama", bits=4, group_size=32, sym=False)
    with caplog.at_level(logging.WARNING, logger="hf_autoround.export.gptq_awq"):
        export_model(model, None, str(tmp_path / "g"), "auto_gptq")
    assert any("asymmetric" in r.message for r in caplog.records)


def test_awq_refuses_other_bits(tmp_path):
    model = _quantized_tiny("llama", bits=2, group_size=32, sym=True)
    with pytest.raises(ValueError, match="4-bit"):
        export_model(model, None, str(tmp_path / "a"), "auto_awq")
    assert not os.path.exists(tmp_path / "a")


def test_float_model_refused_for_safetensors_formats(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_model(build_tiny_model("llama"), None, str(tmp_path / "f"), "auto_gptq")


def test_gptq_with_float_layers_and_quantized_lm_head(tmp_path, token_batch):
    model = _quantized_tiny("llama", bits=4, group_size=32, sym=True, quant_lm_head=True,
                           extra_config={"model.layers.1.mlp.down_proj": {"bits": 16}})
    assert isinstance(model.lm_head, QuantLinear)
    assert not isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    out = str(tmp_path / "g")
    export_model(model, None, out, "auto_gptq")
    q = _qconfig(out)
    assert q["lm_head"] is True and q["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj"]
    reloaded = _reload(out, model)
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert not isinstance(reloaded.model.layers[1].mlp.down_proj, QuantLinear)
    with torch.no_grad():
        assert torch.equal(reloaded(token_batch).logits, model(token_batch).logits)
