"""Activation-aware channel scaling: the fold leaves the float model unchanged, the Gram-matrix error is the output
error, the search favours loud channels, sites are used only where a scale folds exactly, and the rewritten norms
reach the checkpoint in every mode (in memory, resumed, low memory)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from tuning_helpers import calib, one_thread  # noqa: F401  (autouse)

from hf_autoround import AutoRound
from hf_autoround.scheme import QuantScheme
from hf_autoround.qdq import qdq
from hf_autoround.tuning.channel_scaling import (InputGram, exact_sites, find_sites, fold_scale, output_error,
                                                 scale_block, search_site)
from hf_autoround.tuning.lazy_blocks import load_lazily
from hf_autoround.tuning.resume import ResumeState

SCHEME = QuantScheme(bits=2, group_size=32, sym=False)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def loud_llama(kv_heads: int = 2, seed: int = 0):
    """A tiny Llama whose norms and up_proj make a few input channels of every linear much louder than the rest
    (as trained models have), so that scaling them pays."""
    config = tiny_config("llama")
    config.num_key_value_heads = kv_heads
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 12
            layer.post_attention_layernorm.weight[:4] *= 12
            layer.mlp.up_proj.weight[:6] *= 8
    return model



def settings(**kw):
    base = dict(bits=2, group_size=32, iters=4, lr=0.05, nsamples=8, seqlen=24, batch_size=4, dataset=calib(),
                progress=False)
    base.update(kw)
    return base


def test_folding_any_scale_leaves_the_float_model_unchanged():
    model = loud_llama(kv_heads=4)  # no GQA: the v_proj -> o_proj site exists too
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(x).logits
        for block in model.model.layers:
            sites = find_sites(block, {n: SCHEME for n in LINEARS})
            assert [s.source for s in sites] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj",
                                                 "self_attn.v_proj"]
            for site in sites:
                width = block.get_submodule(site.consumers[0]).in_features
                fold_scale(block, site, torch.rand(width) * 1.5 + 0.5)
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)


def test_gram_error_is_the_output_error():
    torch.manual_seed(0)
    x, w, s = torch.randn(50, 64), torch.randn(24, 64), torch.rand(64) + 0.5
    direct = (x @ w.t() - (x / s) @ qdq(w * s, SCHEME).t()).pow(2).sum()
    assert output_error([w], [SCHEME], x.t() @ x, s) == pytest.approx(float(direct), rel=1e-4)


def test_search_favours_loud_channels():
    torch.manual_seed(0)
    x = torch.randn(400, 64)
    x[:, :3] *= 25
    weights = [torch.randn(24, 64), torch.randn(16, 64)]
    s, alpha, err, unscaled = search_site(weights, [SCHEME, SCHEME], x.t() @ x)
    assert alpha > 0 and err < unscaled
    assert s[:3].min() > s[3:].max()  # the loud channels get the larger share of the grid


def test_sites_only_where_a_scale_folds_exactly():
    block = loud_llama(kv_heads=2).model.layers[0]
    planned = {n: SCHEME for n in LINEARS}
    sources = [s.source for s in find_sites(block, planned)]
    assert "self_attn.v_proj" not in sources  # GQA: v_proj has fewer outputs than o_proj has inputs
    del planned["self_attn.q_proj"]  # a site needs every reader planned
    assert [s.source for s in find_sites(block, planned)] == ["post_attention_layernorm", "mlp.up_proj"]
    grouped = {f"3.{n}": SCHEME for n in LINEARS}
    group = nn.ModuleDict({"3": block})  # names inside a group of blocks carry the block's index
    assert [s.source for s in find_sites(group, grouped)] == ["3.input_layernorm", "3.post_attention_layernorm",
                                                              "3.mlp.up_proj"]


class OffsetNorm(nn.Module):
    """Gemma's RMSNorm form: the output scales with ``1 + weight``, not with ``weight``."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)


class ToyBlock(nn.Module):
    """Llama's names around other wiring: ``parallel`` (one norm feeds attention and MLP), ``gated`` (else a
    squared ReLU after up_proj, as in Nemotron), ``offset_norm`` (Gemma's norm)."""

    def __init__(self, parallel=False, gated=True, offset_norm=False, width=16):
        super().__init__()
        torch.manual_seed(0)
        norm = OffsetNorm if offset_norm else (lambda w: LlamaRMSNorm(w))
        self.input_layernorm, self.post_attention_layernorm = norm(width), norm(width)
        self.self_attn = nn.ModuleDict({n: nn.Linear(width, width) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(width, 32), "up_proj": nn.Linear(width, 32),
                                  "down_proj": nn.Linear(32, width)})
        self.parallel, self.gated = parallel, gated

    def forward(self, x):
        h = self.input_layernorm(x)
        a = self.self_attn
        x = x + a["o_proj"](a["q_proj"](h) * a["k_proj"](h) + a["v_proj"](h))
        m = h if self.parallel else self.post_attention_layernorm(x)
        up = self.mlp["up_proj"](m)
        inner = torch.sigmoid(self.mlp["gate_proj"](m)) * up if self.gated else torch.relu(up).pow(2)
        return x + self.mlp["down_proj"](inner)


def _exact(block):
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
    sites = find_sites(block, {n: SCHEME for n in LINEARS})
    return [s.source for s in exact_sites(block, sites, lambda: block(x))]


def test_only_sites_whose_fold_is_exact_on_the_block_are_used():
    assert _exact(ToyBlock()) == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj"]
    # o_proj reads q*k + v here, not v alone: the v_proj site is named but does not fold exactly
    assert "self_attn.v_proj" in [s.source for s in find_sites(ToyBlock(), {n: SCHEME for n in LINEARS})]
    # one norm feeds attention and MLP (the other norm is unused): neither norm site folds exactly
    assert _exact(ToyBlock(parallel=True)) == ["mlp.up_proj"]
    assert _exact(ToyBlock(gated=False)) == ["input_layernorm", "post_attention_layernorm"]
    assert _exact(ToyBlock(offset_norm=True)) == ["mlp.up_proj"]
    block, x = ToyBlock(), torch.randn(1, 3, 16)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    exact_sites(block, find_sites(block, {n: SCHEME for n in LINEARS}), lambda: block(x))
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())  # every trial undone


def test_scale_block_updates_the_activation_sums_to_the_scaled_inputs():
    block = loud_llama().model.layers[0]
    layers = {n: SCHEME for n in LINEARS}
    sites = find_sites(block, layers)
    torch.manual_seed(0)
    x = torch.randn(3, 10, 64)
    norm_x = block.input_layernorm(x)
    with InputGram(block, sites[:1]) as grams:
        block.self_attn.q_proj(norm_x)
    sums = {n: norm_x.pow(2).reshape(-1, 64).sum(0) for n in sites[0].consumers}
    before = block.input_layernorm.weight.detach().clone()
    assert scale_block(block, layers, sites[:1], grams.grams, sums)["input_layernorm"] > 0
    scaled_x = block.input_layernorm(x)
    torch.testing.assert_close(sums["self_attn.q_proj"], scaled_x.pow(2).reshape(-1, 64).sum(0), rtol=1e-4,
                               atol=1e-6)
    assert not torch.equal(block.input_layernorm.weight, before)


def test_tuning_scales_channels_and_the_checkpoint_holds_the_rewritten_norms(tmp_path):
    model, original = loud_llama(), loud_llama()
    ar = AutoRound(model, None, **settings())
    ar.quantize_and_save(str(tmp_path / "out"))
    chosen = {site: alpha for b in ar.report.blocks for site, alpha in b.scaling.items()}
    assert len(chosen) == 3 and max(chosen.values()) > 0
    saved = load_file(tmp_path / "out" / "model.safetensors")
    key = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(saved[key], original.state_dict()[key])
    torch.testing.assert_close(saved[key], model.state_dict()[key], rtol=0, atol=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_channel_scaling_false_keeps_the_norms():
    model, original = loud_llama(), loud_llama()
    ar = AutoRound(model, None, channel_scaling=False, **settings())
    ar.quantize()
    assert len(ar.report.blocks) == 2 and all(not b.scaling for b in ar.report.blocks)
    key = "model.layers.1.post_attention_layernorm.weight"
    assert torch.equal(model.state_dict()[key], original.state_dict()[key])
    with pytest.raises(ValueError, match="channel_scaling='yes': expected True or False"):
        AutoRound(loud_llama(), None, channel_scaling="yes", **settings()).quantize()


def _same_tensors(a, b):
    ta, tb = (load_file(os.path.join(d, "model.safetensors")) for d in (a, b))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


class _Stop(Exception):
    pass


def test_resumed_and_low_memory_runs_keep_the_rewritten_norms(tmp_path, monkeypatch):
    AutoRound(loud_llama(), None, **settings()).quantize_and_save(str(tmp_path / "plain"))

    record = ResumeState.record_block

    def stop_after_block_0(self, container, index, *args):
        record(self, container, index, *args)
        raise _Stop

    monkeypatch.setattr(ResumeState, "record_block", stop_after_block_0)
    with pytest.raises(_Stop):
        AutoRound(loud_llama(), None, resume=True, **settings()).quantize_and_save(str(tmp_path / "resumed"))
    monkeypatch.setattr(ResumeState, "record_block", record)
    AutoRound(loud_llama(), None, resume=True, **settings()).quantize_and_save(str(tmp_path / "resumed"))
    _same_tensors(tmp_path / "plain", tmp_path / "resumed")  # block 0's norms came back from the resume store

    loud_llama().save_pretrained(tmp_path / "float")
    AutoRound(load_lazily(str(tmp_path / "float")), None, low_cpu_mem_usage=True, **settings()) \
        .quantize_and_save(str(tmp_path / "lazy"))
    _same_tensors(tmp_path / "plain", tmp_path / "lazy")  # streamed from the block store, not the float files
