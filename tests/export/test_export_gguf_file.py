"""GGUF files we write, read back by transformers' own GGUF loader: its dequantised weights equal ours exactly
and the logits match (the real small Llama of the fixtures: hidden 256, SentencePiece tokenizer)."""
from __future__ import annotations

import os

import pytest
import torch
from gguf_test_helpers import one_thread  # noqa: F401 (autouse fixture)

from conftest import FIXTURES

from hf_autoround import AutoRoundConfig
from hf_autoround.export import export_model
from hf_autoround.export.gguf.writer import dequantized_float_model, quantize_model_tensors, write_gguf
from hf_autoround.quantize import quantize_model

FLOAT = os.path.join(FIXTURES, "float")
# every block layout is checked against the gguf package's dequantisers in test_export_gguf_blocks; here each
# k-quant, both 32-blocks families and a float type go through the whole file + transformers loader (~3 s each)
FORMATS = ["q4_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q3_k_m", "bf16"]




@pytest.fixture(scope="module")
def float_llama():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(FLOAT):
        pytest.skip(f"{FLOAT} is missing")
    model = AutoModelForCausalLM.from_pretrained(FLOAT, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(FLOAT)


def _load_gguf(directory: str):
    from transformers import AutoModelForCausalLM

    files = [f for f in os.listdir(directory) if f.endswith(".gguf")]
    assert len(files) == 1, files
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=files[0], dtype=torch.float32).eval(), files[0]


def _assert_same_model(ours, theirs, ids):
    s1, s2 = ours.state_dict(), theirs.state_dict()
    assert set(s1) == set(s2)
    unequal = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    assert not unequal, unequal[:5]
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


@pytest.mark.parametrize("fmt", FORMATS)
def test_transformers_reads_our_gguf(tmp_path, float_llama, fmt):
    model, tokenizer = float_llama
    tensors = write_gguf(model, tokenizer, str(tmp_path / "m.gguf"), fmt)
    loaded, _ = _load_gguf(str(tmp_path))
    expected = dequantized_float_model(model, tensors)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    _assert_same_model(expected, loaded, ids)
    if fmt not in ("bf16", "f16", "q8_0"):  # quantisation actually happened
        w0 = model.model.layers[0].mlp.down_proj.weight
        assert not torch.equal(loaded.model.layers[0].mlp.down_proj.weight, w0)


def test_tokenizer_round_trips(tmp_path, float_llama):
    from transformers import AutoTokenizer

    model, tokenizer = float_llama
    out = str(tmp_path / "tok")
    export_model(model, tokenizer, out, "gguf:q8_0")
    name = next(f for f in os.listdir(out) if f.endswith(".gguf"))
    theirs = AutoTokenizer.from_pretrained(out, gguf_file=name)
    text = "The quick brown fox jumps over the lazy dog; 12345 ünïcödé."
    assert theirs(text).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("bits,sym,fmt", [(4, True, "q4_0"), (8, True, "q8_0"), (4, False, "q4_1"),
                                          (4, False, "q4_k_m")])
def test_quantized_model_exports_its_own_grid(tmp_path, float_llama, bits, sym, fmt):
    """A QuantLinear model whose scheme is the type's grid has its codes and scales taken over: Q4_0 / Q8_0 equal
    the in-memory QuantLinear weights exactly, Q4_1 up to the fp16 rounding of its min (-zero * scale); any other
    type (Q4_K here) re-quantises the dequantised weights. The reader always gets what we say it gets."""
    import copy

    from hf_autoround.qdq import dequantize_weight

    model, tokenizer = float_llama
    qmodel = copy.deepcopy(model)
    quantize_model(qmodel, AutoRoundConfig(bits=bits, group_size=32, sym=sym, iters=0), progress=False)
    out = str(tmp_path / "q")
    export_model(qmodel, tokenizer, out, f"gguf:{fmt}")
    loaded, _ = _load_gguf(out)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        ours = dequantize_weight(qmodel.model.layers[1].get_submodule(name).unpack())
        theirs = loaded.model.layers[1].get_submodule(name).weight
        if fmt in ("q4_0", "q8_0"):
            assert torch.equal(theirs, ours)
        elif fmt == "q4_1":
            assert torch.allclose(theirs, ours, rtol=0, atol=ours.abs().max().item() * 2**-10)
        else:
            assert not torch.equal(theirs, ours)
    ids = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    expected = dequantized_float_model(qmodel, quantize_model_tensors(qmodel, fmt))
    _assert_same_model(expected, loaded, ids)


def test_reference_gguf_has_our_structure(tmp_path, float_llama):
    """The reference's q4_0 file of the same model and ours hold the same tensors, types and shapes."""
    import gguf

    ref_dir = os.path.join(FIXTURES, "gguf_q4_0")
    ref_file = next(f for f in os.listdir(ref_dir) if f.endswith(".gguf"))
    model, tokenizer = float_llama
    out = str(tmp_path / "q4_0")
    export_model(model, tokenizer, out, "gguf:q4_0")
    ours = gguf.GGUFReader(os.path.join(out, next(f for f in os.listdir(out) if f.endswith(".gguf"))))
    ref = gguf.GGUFReader(os.path.join(ref_dir, ref_file))

    def table(r):
        return {t.name: (t.tensor_type, tuple(int(x) for x in t.shape)) for t in r.tensors}

    assert table(ours) == table(ref)
    for key in ("llama.rope.dimension_count", "llama.attention.head_count_kv", "tokenizer.ggml.model",
                "tokenizer.ggml.bos_token_id", "llama.context_length"):
        assert ours.fields[key].contents() == ref.fields[key].contents(), key
    # the reference file itself loads in transformers (our consumer test is not vacuous)
    loaded, _ = _load_gguf(ref_dir)
    assert loaded.config.num_hidden_layers == model.config.num_hidden_layers


def test_tuned_grid_params_are_written_unchanged(tmp_path, float_llama):
    """Block parameters computed elsewhere on a type's grid (as GGUF-aware tuning would, with its rounding
    perturbation v) land in the file as they are: the reader gets exactly ``grid.qdq(w, type, v)``."""
    from hf_autoround.export.gguf import grid

    model, tokenizer = float_llama
    name = "model.layers.0.self_attn.q_proj.weight"  # permuted rows in the file: the override must survive that
    w = model.get_parameter(name).detach()
    v = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) - 0.5
    params = {name: ("q4_k", grid.block_params(w, "q4_k", v))}
    write_gguf(model, tokenizer, str(tmp_path / "t.gguf"), "q4_k", params=params)
    loaded, _ = _load_gguf(str(tmp_path))
    got = loaded.get_parameter(name)
    assert torch.equal(got, grid.qdq(w, "q4_k", v))
    assert not torch.equal(got, grid.qdq(w, "q4_k"))
    with pytest.raises(ValueError, match="grid"):
        write_gguf(model, tokenizer, str(tmp_path / "u.gguf"), "q4_0", params=params)


def test_qwen2_with_biases_and_untied_head(tmp_path, float_llama):
    """No q/k permutation for Qwen2, attention biases written as F32, a separate output.weight (Q6_K)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    _, tokenizer = float_llama
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.bias.normal_(0, 0.1)
    tensors = write_gguf(model, tokenizer, str(tmp_path / "q.gguf"), "q4_k_m")
    types = {t.gguf_name: t.qtype.name for t in tensors}
    assert types["output.weight"] == "Q6_K" and types["blk.0.attn_q.bias"] == "F32"
    loaded, _ = _load_gguf(str(tmp_path))
    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    _assert_same_model(dequantized_float_model(model, tensors), loaded, ids)
