"""Format names, scheme compatibility and output directories are checked before any tuning; mixes follow
llama.cpp's choices."""
from __future__ import annotations

import os

import pytest
from gguf import GGMLQuantizationType as T

from conftest import build_tiny_model

from hf_autoround import AutoRoundConfig, QuantScheme
from hf_autoround.export import export_model, parse_formats
from hf_autoround.export.gguf import native_scheme
from hf_autoround.export.gguf.mixes import tensor_type


def test_known_formats_parse():
    names = parse_formats("auto_round, auto_gptq,auto_awq,auto_round:auto_gptq,auto_round:auto_awq,gguf:q4_k_m")
    assert names[-1] == "gguf:q4_k_m" and len(names) == 6


@pytest.mark.parametrize("fmt", ["nope", "gguf:q7_k", "gptq", "gguf", "auto_round:marlin"])
def test_unknown_format(fmt):
    with pytest.raises(ValueError, match="unknown"):
        parse_formats(fmt)


def test_empty_and_duplicate():
    with pytest.raises(ValueError, match="no format"):
        parse_formats(" , ")
    with pytest.raises(ValueError, match="twice"):
        parse_formats("auto_gptq,auto_gptq")


@pytest.mark.parametrize("fmt,scheme,match", [
    ("auto_awq", QuantScheme(2, 128, True), "4-bit"),
    ("auto_round:auto_awq", QuantScheme(8, 128, True), "4-bit"),
    ("gguf:q4_0", QuantScheme(4, 128, True), "group_size=32"),
    ("gguf:q4_k_m", QuantScheme(4, 32, True), "sym=False"),
    ("gguf:q2_k_s", QuantScheme(2, 32, False), "group_size=16"),
    ("auto_gptq,gguf:q5_k_m", QuantScheme(4, 32, False), "Q5_K"),  # alone it is tuned on its grid
])
def test_format_cannot_hold_scheme(fmt, scheme, match):
    with pytest.raises(ValueError, match=match):
        parse_formats(fmt, scheme=scheme)


@pytest.mark.parametrize("fmt,scheme", [
    ("auto_gptq", QuantScheme(3, 128, True)), ("auto_awq", QuantScheme(4, 64, False)),
    ("gguf:q4_0", QuantScheme(4, 32, True)), ("gguf:q4_k_m", QuantScheme(4, 32, False)),
    ("gguf:q3_k_s", QuantScheme(3, 16, True)), ("gguf:bf16", QuantScheme(2, 64, False)),
    ("gguf:q6_k", None),
])
def test_format_holds_scheme(fmt, scheme):
    assert parse_formats(fmt, scheme=scheme) == [fmt]


def test_scheme_from_config():
    with pytest.raises(ValueError, match="group_size=32"):
        parse_formats("gguf:q8_0", scheme=AutoRoundConfig(bits=8, group_size=128))
    assert native_scheme("gguf:q8_0") == QuantScheme(8, 32, True)


def test_output_dir_not_empty(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        parse_formats("auto_gptq", output_dir=str(tmp_path / "taken"))
    assert parse_formats("auto_gptq", output_dir=str(tmp_path / "taken"), overwrite=True) == ["auto_gptq"]
    (tmp_path / "multi" / "auto_awq").mkdir(parents=True)
    (tmp_path / "multi" / "auto_awq" / "y").write_text("y")
    with pytest.raises(ValueError, match="auto_awq"):
        parse_formats("auto_gptq,auto_awq", output_dir=str(tmp_path / "multi"))
    assert parse_formats("auto_gptq,gguf:q4_0", output_dir=str(tmp_path / "multi")) == ["auto_gptq", "gguf:q4_0"]


def test_gguf_refuses_without_tokenizer_and_leaves_nothing(tmp_path):
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="tokenizer"):
        export_model(model, None, str(tmp_path / "g"), "gguf:q8_0")
    assert not os.path.exists(tmp_path / "g") and os.listdir(tmp_path) == []


def test_gguf_refuses_unknown_architecture(tmp_path):
    with pytest.raises(ValueError, match="model types"):
        export_model(build_tiny_model("opt"), object(), str(tmp_path / "o"), "gguf:q8_0")


def _types(mix, n_layers=32, n_gqa=1, tied=False):
    names = [f"blk.{i}.{role}.weight" for i in range(n_layers)
             for role in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    out = {n: tensor_type(mix, n, (4096, 4096), n_layers, n_gqa, tied) for n in names}
    out["output.weight"] = tensor_type(mix, "output.weight", (32000, 4096), n_layers, n_gqa, tied)
    out["token_embd.weight"] = tensor_type(mix, "token_embd.weight", (32000, 4096), n_layers, n_gqa, tied)
    out["blk.0.attn_norm.weight"] = tensor_type(mix, "blk.0.attn_norm.weight", (4096,), n_layers, n_gqa, tied)
    return out


def test_q4_k_m_mix_like_llama_cpp():
    t = _types("q4_k_m")
    more = [i for i in range(32) if t[f"blk.{i}.ffn_down.weight"] == T.Q6_K]
    # use_more_bits: the first and last eighth, and every third layer in between
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(32) if t[f"blk.{i}.attn_v.weight"] == T.Q6_K] == more
    assert t["blk.5.attn_q.weight"] == T.Q4_K and t["output.weight"] == T.Q6_K
    assert t["token_embd.weight"] == T.Q4_K and t["blk.0.attn_norm.weight"] == T.F32
    assert _types("q4_k_m", tied=True)["token_embd.weight"] == T.Q6_K


def test_other_mixes():
    s = _types("q4_k_s")
    assert [i for i in range(32) if s[f"blk.{i}.attn_v.weight"] == T.Q5_K] == [0, 1, 2, 3]
    assert [i for i in range(32) if s[f"blk.{i}.ffn_down.weight"] == T.Q5_K] == [0, 1, 2, 3]
    m = _types("q3_k_m")
    assert m["blk.0.attn_v.weight"] == T.Q5_K and m["blk.2.attn_v.weight"] == T.Q4_K
    assert m["blk.1.ffn_down.weight"] == T.Q5_K and m["blk.2.ffn_down.weight"] == T.Q4_K
    assert m["blk.7.attn_output.weight"] == T.Q4_K and m["blk.7.attn_q.weight"] == T.Q3_K
    assert set(_types("q3_k_l")[f"blk.3.{r}.weight"] for r in ("attn_v", "ffn_down", "attn_output")) == {T.Q5_K}
    assert _types("q2_k_s", n_gqa=4)["blk.9.attn_v.weight"] == T.Q4_K
    assert _types("q2_k_s", n_gqa=1)["blk.9.attn_v.weight"] == T.Q2_K
    assert set(_types("q6_k").values()) == {T.Q6_K, T.F32}
    assert set(_types("q8_0").values()) == {T.Q8_0, T.F32}
    assert set(_types("bf16").values()) == {T.BF16, T.F32}


def test_rows_that_do_not_fit_fall_back():
    assert tensor_type("q4_k_m", "blk.0.attn_q.weight", (64, 96), 2, 1, False) == T.Q5_0
    assert tensor_type("q6_k", "blk.0.attn_q.weight", (64, 96), 2, 1, False) == T.Q8_0
    assert tensor_type("q2_k", "blk.0.attn_q.weight", (64, 40), 2, 1, False) == T.F16


def test_nothing_written_when_a_later_format_cannot_be(tmp_path):
    from hf_autoround.quantize import quantize_model

    model = build_tiny_model("llama")
    quantize_model(model, AutoRoundConfig(bits=4, group_size=32, iters=0), progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        export_model(model, None, str(tmp_path / "out"), "auto_gptq,gguf:q4_0")
    assert not os.path.exists(tmp_path / "out" / "auto_gptq")
