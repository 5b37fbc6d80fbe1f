"""The seed-compatible API: output directory exactly as given, mixed precision recorded and honoured on load,
recipes, clear errors."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM
from tuning_helpers import calib, one_thread  # noqa: F401  (autouse)

from hf_autoround import AutoRound
from hf_autoround.autoround import build_extra_config, parse_scheme
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.recipes import apply_recipe, recipe_overrides



def small(model, **kw):
    base = dict(bits=4, group_size=32, iters=4, nsamples=8, seqlen=24, batch_size=4, dataset=calib(), progress=False)
    base.update(kw)
    return AutoRound(model, None, **base)


def test_quantize_and_save_writes_exactly_the_given_dir_and_loads(tmp_path):
    model = build_tiny_model("qwen2")
    out = tmp_path / "ckpt"
    ar = small(model, layer_config={"mlp.down_proj": {"bits": 8}}, fp_layers="layers.1.self_attn.o_proj")
    _, dirs = ar.quantize_and_save(str(out), format="auto_round")
    assert dirs == [str(out)] and os.path.isfile(out / "config.json") and os.path.isfile(out / "model.safetensors")
    extra = model.config.quantization_config.extra_config
    assert extra["model.layers.1.self_attn.o_proj"] == {"bits": 16}
    assert extra["model.layers.0.mlp.down_proj"]["bits"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert loaded.model.layers[0].mlp.down_proj.spec.scheme.bits == 8
    assert not isinstance(loaded.model.layers[1].self_attn.o_proj, QuantLinear)
    for name, layer in model.named_modules():  # the stored integers are exactly the tuned ones
        if isinstance(layer, QuantLinear):
            twin = loaded.get_submodule(name).packed_tensors()
            assert all(torch.equal(t, twin[k]) for k, t in layer.packed_tensors().items())
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():  # the loaded model may pick a faster kernel (bf16 activations): close, not equal
        torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=2e-2, rtol=2e-2)


def test_to_quant_block_names_and_refused_tied_lm_head():
    model = build_tiny_model("opt")
    ar = small(model, to_quant_block_names="model.decoder.layers")
    _, layer_config = ar.quantize()
    assert all(n.startswith("model.decoder.layers.") for n in layer_config)
    assert ar.report is not None and len(ar.report.blocks) == 2
    tied = build_tiny_model("llama")
    tied.config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        small(tied, quant_lm_head=True).quantize()


def test_recipes_and_explicit_arguments():
    assert recipe_overrides("light") == {"iters": 50, "lr": 5e-3}
    assert recipe_overrides("auto-round-best")["nsamples"] == 512
    assert apply_recipe("light", {"iters": 7, "lr": None}) == {"iters": 7, "lr": 5e-3}
    ar = AutoRound(build_tiny_model("llama"), None, recipe="rtn", bits=2, progress=False)
    assert (ar.config.iters, ar.config.bits) == (0, 2)
    with pytest.raises(ValueError, match="recipe='fast' is unknown"):
        AutoRound(build_tiny_model("llama"), None, recipe="fast")


def test_rtn_recipe_without_data_is_plain_rtn():
    from hf_autoround import AutoRoundConfig
    from hf_autoround.quantize import quantize_model

    a, b = build_tiny_model("llama"), build_tiny_model("llama")
    AutoRound(a, None, recipe="rtn", group_size=32, progress=False).quantize()
    quantize_model(b, AutoRoundConfig(group_size=32, iters=0), progress=False)
    la, lb = a.model.layers[0].mlp.up_proj, b.model.layers[0].mlp.up_proj
    assert torch.equal(la.qweight, lb.qweight) and torch.equal(la.scales, lb.scales)


def test_scheme_strings_and_layer_config_forms():
    assert parse_scheme("W4A16") == {"bits": 4}
    assert parse_scheme("W2G64") == {"bits": 2, "group_size": 64}
    with pytest.raises(ValueError, match="not understood"):
        parse_scheme("NVFP4")
    assert build_extra_config({"q_proj": 8, "k_proj": "W3G32"}, "lm_head,gate") == {
        "q_proj": {"bits": 8}, "k_proj": {"bits": 3, "group_size": 32}, "lm_head": {"bits": 16},
        "gate": {"bits": 16}}


def test_save_before_quantize_and_non_empty_output_dir(tmp_path):
    ar = small(build_tiny_model("llama"))
    with pytest.raises(ValueError, match="call quantize"):
        ar.save_quantized(str(tmp_path / "x"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        ar.quantize_and_save(str(tmp_path / "full"))
    assert not ar.quantized  # refused before any tuning
