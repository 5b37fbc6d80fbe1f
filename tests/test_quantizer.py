"""The transformers integration end to end on tiny random models: quantize path, save, pre-quantized load."""
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_autoround import AutoRoundConfig
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.quantizer import AutoRoundHfQuantizer

from helpers import logits, quantize_dir, rel_error

SCHEMES = [
    dict(bits=4, group_size=32, sym=True),
    dict(bits=4, group_size=-1, sym=False),
    dict(bits=2, group_size=32, sym=False),
    dict(bits=3, group_size=32, sym=True),
    dict(bits=8, group_size=-1, sym=True),
    dict(bits=4, group_size=32, sym=False, packing_format="auto_round:auto_awq"),
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_quantize_save_reload_round_trip(tiny_float_dir, scheme, tmp_path, token_batch):
    arch, float_dir = tiny_float_dir
    model = quantize_dir(float_dir, tmp_path, **scheme)
    assert isinstance(model.hf_quantizer, AutoRoundHfQuantizer)
    expected = logits(model, token_batch)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    n_quant = sum(isinstance(m, QuantLinear) for m in reloaded.modules())
    assert n_quant == sum(isinstance(m, QuantLinear) for m in model.modules()) > 0
    assert rel_error(logits(reloaded, token_batch), expected) <= 1e-4

    float_model = AutoModelForCausalLM.from_pretrained(float_dir)
    err = rel_error(expected, logits(float_model, token_batch))
    assert 0 < err < {2: 0.6, 3: 0.35, 4: 0.2, 8: 0.02}[scheme["bits"]]  # a wrong load gives ~1


def test_saved_config_describes_the_checkpoint(tiny_float_dir, tmp_path):
    arch, float_dir = tiny_float_dir
    quantize_dir(float_dir, tmp_path, bits=4, group_size=32, sym=True)
    qc = json.load(open(os.path.join(tmp_path, "config.json")))["quantization_config"]
    assert qc["quant_method"] == "auto-round" and qc["packing_format"] == "auto_round:auto_gptq"
    assert qc["bits"] == 4 and qc["group_size"] == 32 and qc["sym"] is True and qc["data_type"] == "int"
    assert qc["block_name_to_quantize"] == ("model.decoder.layers" if arch == "opt" else "model.layers")
    assert "backend" not in qc


def test_biases_are_kept(tmp_path, token_batch):
    from conftest import build_tiny_model

    build_tiny_model("opt").save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q", bits=8, group_size=-1)
    layer = model.model.decoder.layers[0].fc1
    assert isinstance(layer, QuantLinear) and layer.bias is not None and layer.bias.abs().sum() > 0


def test_lm_head_and_embeddings_stay_float(tmp_path):
    from conftest import build_tiny_model

    build_tiny_model("llama").save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q")
    assert type(model.lm_head) is torch.nn.Linear
    assert type(model.model.embed_tokens) is torch.nn.Embedding


def test_unpackable_layers_stay_float_and_are_recorded(tmp_path, token_batch, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # head_dim 20 -> k/v projections with 40 outputs: not a multiple of 32 for 3-bit packing
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=20, vocab_size=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    with caplog.at_level("INFO", logger="hf_autoround"):
        model = quantize_dir(tmp_path / "f", tmp_path / "q", bits=3, group_size=32)
    assert type(model.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert "kept in float: model.layers.0.self_attn.k_proj" in caplog.text
    qc = json.load(open(tmp_path / "q" / "config.json"))["quantization_config"]
    assert qc["extra_config"]["model.layers.0.self_attn.k_proj"] == {"bits": 16}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert type(reloaded.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert rel_error(logits(reloaded, token_batch), logits(model, token_batch)) <= 1e-4


def test_partial_last_group_round_trip(tmp_path, token_batch):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # hidden 96 with group 64: the last group of each row has 32 weights
    cfg = LlamaConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q", bits=4, group_size=64)
    assert model.model.layers[0].self_attn.q_proj.scales.shape == (2, 96)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert rel_error(logits(reloaded, token_batch), logits(model, token_batch)) <= 1e-4


def test_mixed_bits_via_extra_config(tmp_path, token_batch):
    from conftest import build_tiny_model

    build_tiny_model("llama").save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q", bits=4, group_size=32,
                         extra_config={"mlp.down_proj": {"bits": 8}, "layers.1.self_attn.o_proj": {"bits": 16}})
    assert model.model.layers[0].mlp.down_proj.spec.scheme.bits == 8
    assert type(model.model.layers[1].self_attn.o_proj) is torch.nn.Linear
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.model.layers[1].mlp.down_proj.spec.scheme.bits == 8
    assert rel_error(logits(reloaded, token_batch), logits(model, token_batch)) <= 1e-4


def test_quantizing_twice_is_refused(tmp_path):
    from conftest import build_tiny_model

    build_tiny_model("llama").save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized"):
        model.quantize()


def test_tied_lm_head_cannot_be_quantized(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "f")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "f",
                                                 quantization_config=AutoRoundConfig(iters=0, quant_lm_head=True))
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        model.quantize()


def test_untied_lm_head_is_quantized_on_request(tmp_path, token_batch):
    from conftest import build_tiny_model

    build_tiny_model("llama").save_pretrained(tmp_path / "f")
    model = quantize_dir(tmp_path / "f", tmp_path / "q", group_size=32, quant_lm_head=True)
    assert isinstance(model.lm_head, QuantLinear)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(reloaded.lm_head, QuantLinear)
    assert rel_error(logits(reloaded, token_batch), logits(model, token_batch)) <= 1e-4
