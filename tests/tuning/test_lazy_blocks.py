"""Low-memory mode: blocks read from the checkpoint files one at a time, tuned, stored and dropped; the saved
checkpoint holds exactly the tensors of the in-memory run; a killed low-memory run resumes too."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from conftest import build_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from tuning_helpers import calib, one_thread  # noqa: F401  (autouse)

from hf_autoround import AutoRound
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.tuning.lazy_blocks import LazyBlocks, lazy_blocks_of, load_lazily, materialize
from hf_autoround.tuning.resume import ResumeState



def settings(**kw):
    base = dict(bits=2, group_size=32, iters=6, lr=0.05, nsamples=8, seqlen=24, batch_size=4, dataset=calib(),
                progress=False)
    base.update(kw)
    return base


def saved(tmp_path, arch, dtype, tie=False) -> str:
    model = build_tiny_model(arch)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    path = str(tmp_path / f"{arch}-src")
    model.to(dtype).save_pretrained(path)
    return path


def tensors(directory) -> dict:
    return load_file(os.path.join(directory, "model.safetensors"))


def assert_same_checkpoint(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in ("config.json", "quantization_config.json"):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read()


@pytest.mark.parametrize("arch,dtype,tie", [("llama", torch.float32, True), ("qwen2", torch.bfloat16, False)])
def test_low_memory_checkpoint_equals_the_in_memory_one(tmp_path, arch, dtype, tie, monkeypatch):
    path = saved(tmp_path, arch, dtype, tie)
    AutoRound(AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval(), None, **settings()) \
        .quantize_and_save(str(tmp_path / "normal"))

    lazy_model = load_lazily(path)
    blocks = lazy_model.model.layers
    real_blocks = []
    load = LazyBlocks.load

    def spy(self, prefix, block):  # no other block holds a real tensor while one is read
        load(self, prefix, block)
        real_blocks.append(sum(any(not t.is_meta for t in b.state_dict().values()) for b in blocks))

    monkeypatch.setattr(LazyBlocks, "load", spy)
    assert all(t.is_meta for t in blocks.state_dict().values())  # nothing of the blocks was read at load
    AutoRound(lazy_model, None, low_cpu_mem_usage=True, **settings()).quantize_and_save(str(tmp_path / "lazy"))
    assert real_blocks == [1, 1]
    assert all(t.is_meta for t in blocks.state_dict().values())  # tuned blocks went to the store
    assert_same_checkpoint(tmp_path / "normal", tmp_path / "lazy")

    materialize(lazy_model)  # and the in-memory model behaves like the normal one
    assert lazy_blocks_of(lazy_model) is None
    normal = AutoModelForCausalLM.from_pretrained(tmp_path / "normal").eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(lazy_model(x).logits.float(), normal(x).logits.float(), atol=0, rtol=0)


def test_low_memory_run_with_blocks_tuned_in_groups(tmp_path):
    path = saved(tmp_path, "llama", torch.float32)
    AutoRound(AutoModelForCausalLM.from_pretrained(path).eval(), None, nblocks=2, **settings()) \
        .quantize_and_save(str(tmp_path / "normal"))
    lazy_model = load_lazily(path)
    AutoRound(lazy_model, None, low_cpu_mem_usage=True, nblocks=2, **settings()) \
        .quantize_and_save(str(tmp_path / "lazy"))
    assert all(t.is_meta for t in lazy_model.model.layers.state_dict().values())  # both blocks went to the store
    assert_same_checkpoint(tmp_path / "normal", tmp_path / "lazy")


def test_low_memory_rtn_and_other_formats(tmp_path):
    path = saved(tmp_path, "llama", torch.float32)
    rtn = dict(bits=4, group_size=32, iters=0, progress=False)
    fmt = "auto_round,auto_gptq"  # auto_gptq is not the model's packing: the lazy model is materialised for it
    AutoRound(AutoModelForCausalLM.from_pretrained(path).eval(), None, **rtn).quantize_and_save(
        str(tmp_path / "normal"), format=fmt)
    lazy_model = load_lazily(path)
    AutoRound(lazy_model, None, **rtn).quantize_and_save(str(tmp_path / "lazy"), format=fmt)
    assert lazy_blocks_of(lazy_model) is None and isinstance(lazy_model.model.layers[1].mlp.up_proj, QuantLinear)
    for sub in ("auto_round", "auto_gptq"):
        assert_same_checkpoint(tmp_path / "normal" / sub, tmp_path / "lazy" / sub)


def test_killed_low_memory_run_resumes_from_its_store(tmp_path):
    path = saved(tmp_path, "llama", torch.float32)
    AutoRound(AutoModelForCausalLM.from_pretrained(path).eval(), None, **settings()) \
        .quantize_and_save(str(tmp_path / "normal"))

    record = ResumeState.record_block

    def stop(self, container, index, *args):
        record(self, container, index, *args)
        raise KeyboardInterrupt

    ResumeState.record_block = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            AutoRound(load_lazily(path), None, low_cpu_mem_usage=True, resume=True, **settings()) \
                .quantize_and_save(str(tmp_path / "lazy"))
    finally:
        ResumeState.record_block = record
    assert os.path.isfile(tmp_path / "lazy.resume" / "block-model.layers.0.safetensors")
    AutoRound(load_lazily(path), None, low_cpu_mem_usage=True, resume=True, **settings()) \
        .quantize_and_save(str(tmp_path / "lazy"))
    assert_same_checkpoint(tmp_path / "normal", tmp_path / "lazy")
    assert not os.path.exists(tmp_path / "lazy.resume")


def test_clear_errors_and_warnings(tmp_path, caplog):
    with pytest.raises(FileNotFoundError, match="low_cpu_mem_usage=True needs a local checkpoint folder"):
        load_lazily(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    build_tiny_model("llama").config.save_pretrained(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has none"):
        load_lazily(str(tmp_path / "empty"))
    from hf_autoround import AutoRoundConfig
    from hf_autoround.quantize import quantize_model

    path = saved(tmp_path, "llama", torch.float32)
    with pytest.raises(ValueError, match="needs the whole model in memory"):
        quantize_model(load_lazily(path), AutoRoundConfig(bits=4, group_size=32, iters=0), gguf_format="gguf:q4_0")
    with caplog.at_level(logging.WARNING):
        AutoRound(build_tiny_model("llama"), None, low_cpu_mem_usage=True, **settings(iters=1)).quantize()
    assert "no effect on a model that is already in memory" in caplog.text
