"""GGUF-aware tuning: one GGUF format asked for -> SignRound tunes on that file's own grids (the mix's type per
tensor), the writer stores the tuned block parameters unchanged, and the file reads back as the tuned model."""
from __future__ import annotations

import os

import pytest
import torch
from tuning_helpers import one_thread  # noqa: F401 (autouse fixture)

from conftest import FIXTURES

from hf_autoround import AutoRound, AutoRoundConfig
from hf_autoround.export import export_model, grid_target, parse_formats
from hf_autoround.export.gguf.grid import GridWeight
from hf_autoround.quantize import quantize_model
from hf_autoround.tuning import TuningReport

FLOAT = os.path.join(FIXTURES, "float")
FMT = "gguf:q4_k_m"


def _float_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isdir(FLOAT):
        pytest.skip(f"{FLOAT} is missing")
    return AutoModelForCausalLM.from_pretrained(FLOAT, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(FLOAT)


def _calib(n=8, seqlen=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 1000, (seqlen,), generator=g) for _ in range(n)]


def _config(**kw):
    base = dict(bits=4, group_size=32, sym=False, iters=20, nsamples=8, seqlen=32, batch_size=8)
    return AutoRoundConfig(**{**base, **kw})


def _load_gguf(directory):
    from transformers import AutoModelForCausalLM

    name = next(f for f in os.listdir(directory) if f.endswith(".gguf"))
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tuned():
    model, tokenizer = _float_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    report = TuningReport()
    # chunks of 3, 3 and 2 samples: the grid wrappers' weights are shared by the chunks of each step (StepWeights)
    quantize_model(model, _config(), dataset=_calib(), progress=False, gguf_format=FMT, report=report,
                   chunk_tokens=3 * 32)
    return model, tokenizer, original, report


def test_each_layer_is_tuned_on_its_mix_type(tuned):
    model, _, _, _ = tuned
    types = model.gguf_tuning.types
    assert len(types) == 14
    assert types["model.layers.1.mlp.down_proj"] == "q6_k" and types["model.layers.1.self_attn.v_proj"] == "q6_k"
    assert types["model.layers.0.mlp.down_proj"] == "q4_k"
    assert not any("QuantLinear" in type(m).__name__ for m in model.modules())


def test_tuning_lowers_each_block_loss(tuned):
    _, _, _, report = tuned
    assert len(report.blocks) == 2
    assert all(b.best_loss < b.first_loss for b in report.blocks), [(b.first_loss, b.best_loss) for b in report.blocks]


def test_file_holds_exactly_the_tuned_weights(tuned, tmp_path):
    model, tokenizer, original, _ = tuned
    export_model(model, tokenizer, str(tmp_path / "q"), FMT)
    loaded = _load_gguf(str(tmp_path / "q"))
    for name, qtype in model.gguf_tuning.types.items():
        key = f"{name}.weight"
        assert torch.equal(loaded.get_parameter(key), model.get_parameter(key)), key
    # the tuned rounding is not the plain one: at least one layer differs from RTN on the same grid
    plain = {n: GridWeight.of(original[f"{n}.weight"], t) for n, t in model.gguf_tuning.types.items()}
    differs = [n for n, g in plain.items()
               if not torch.equal(g.dequantize(g.params(original[f"{n}.weight"])), model.get_parameter(f"{n}.weight"))]
    assert differs


def test_tuned_model_is_written_in_its_format_only(tuned, tmp_path):
    model, tokenizer, _, _ = tuned
    for other in ("auto_round", "gguf:q4_0", "gguf:q4_k_s"):
        with pytest.raises(ValueError, match="gguf:q4_k_m"):
            export_model(model, tokenizer, str(tmp_path / other.replace(":", "-")), other)
        assert not os.path.exists(tmp_path / other.replace(":", "-"))


def test_rtn_on_the_grid_without_data():
    model, _ = _float_model()
    w = model.get_parameter("model.layers.0.mlp.up_proj.weight").detach().clone()
    quantize_model(model, _config(iters=0), progress=False, gguf_format="gguf:q4_k")
    grid = GridWeight.of(w, "q4_k")
    assert torch.equal(model.get_parameter("model.layers.0.mlp.up_proj.weight"), grid.dequantize(grid.params(w)))
    assert set(model.gguf_tuning.types.values()) == {"q4_k"}


def test_formats_without_an_integer_scheme_only_alone():
    """Q5_K / Q6_K types have no integer scheme: tunable on their grid when alone, refused among others. A type
    that has one still asks for it (q4_k_m: W4G32 asym)."""
    config = AutoRoundConfig(bits=4, group_size=32, sym=False)
    assert parse_formats("gguf:q5_k_m", scheme=config) == ["gguf:q5_k_m"]
    assert grid_target(FMT) == FMT
    assert grid_target("auto_round,gguf:q4_k_m") is None and grid_target("gguf:bf16") is None
    with pytest.raises(ValueError, match="alone"):
        parse_formats("auto_round,gguf:q5_k_m", scheme=config)
    with pytest.raises(ValueError, match="group_size=32"):
        parse_formats(FMT, scheme=AutoRoundConfig(bits=4, group_size=128, sym=False))


def test_autoround_quantize_and_save_tunes_on_the_grid(tmp_path):
    model, tokenizer = _float_model()
    ar = AutoRound(model, tokenizer, bits=3, group_size=16, sym=True, iters=2, nsamples=4, seqlen=32, batch_size=4,
                   dataset=_calib(4), progress=False)
    _, dirs = ar.quantize_and_save(str(tmp_path / "out"), format="gguf:q3_k_m")
    assert dirs == [str(tmp_path / "out")]
    assert model.gguf_tuning.fmt == "q3_k_m"
    loaded = _load_gguf(dirs[0])
    key = "model.layers.0.self_attn.v_proj.weight"  # Q5_K in layer 0 of q3_k_m
    assert model.gguf_tuning.types[key[:-len(".weight")]] == "q5_k"
    assert torch.equal(loaded.get_parameter(key), model.get_parameter(key))
