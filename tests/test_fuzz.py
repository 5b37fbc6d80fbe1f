"""Hostile input: random config dictionaries and structurally corrupted checkpoints. Every case either works or
raises a clear error (ValueError / OSError with a message); none loads silently with wrong weights."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_autoround import AutoRoundConfig

from conftest import build_tiny_model
from helpers import logits, quantize_dir, rel_error

CONFIG_CASES = 300
CHECKPOINT_CASES = 60

values = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True),
                   st.text(max_size=12), st.lists(st.text(max_size=8), max_size=3),
                   st.dictionaries(st.text(max_size=8), st.integers(-2, 20), max_size=2))
keys = st.sampled_from(["bits", "group_size", "sym", "data_type", "packing_format", "block_name_to_quantize",
                        "extra_config", "quant_lm_head", "iters", "nsamples", "seqlen", "batch_size", "lr",
                        "minmax_lr", "seed", "backend", "act_bits", "zero_point", "desc_act", "version", "junk"])
methods = st.sampled_from(["auto-round", "intel/auto-round", "gptq", "awq", "unknown", None])


@settings(max_examples=CONFIG_CASES, deadline=None)
@given(st.dictionaries(keys, values, max_size=6), methods)
def test_config_dicts_construct_or_raise_value_error(d, method):
    if method is not None:
        d["quant_method"] = method
    try:
        cfg = AutoRoundConfig.from_dict(d)
    except ValueError:
        return
    assert cfg.bits in (2, 3, 4, 8) and (cfg.group_size == -1 or cfg.group_size > 0)
    assert isinstance(cfg.sym, bool)
    json.dumps(cfg.to_dict())
    cfg.scheme  # noqa: B018 - a valid config has a valid scheme


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    build_tiny_model("llama").save_pretrained(root / "f")
    quantize_dir(root / "f", root / "q", bits=4, group_size=32, sym=False)
    torch.manual_seed(5)
    ids = torch.randint(0, 256, (1, 12))
    return root / "q", ids, logits(AutoModelForCausalLM.from_pretrained(root / "q"), ids)


def _truncate(path, data, frac):
    raw = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(raw[: int(len(raw) * frac)])


def _drop(path, data, key):
    tensors = load_file(path / "model.safetensors")
    tensors.pop(sorted(tensors)[key % len(tensors)])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _reshape(path, data, key):
    tensors = load_file(path / "model.safetensors")
    name = sorted(tensors)[key % len(tensors)]
    t = tensors[name]
    tensors[name] = t.reshape(-1)[: max(1, t.numel() // 2)].clone() if t.dim() == 1 else t[:, :-1].clone() \
        if t.shape[-1] > 1 else t[:-1].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _retype(path, data, key):
    tensors = load_file(path / "model.safetensors")
    name = sorted(tensors)[key % len(tensors)]
    t = tensors[name]
    tensors[name] = t.to(torch.float16) if t.dtype == torch.int32 else t.to(torch.int32)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


# Not drawn: switching an asymmetric checkpoint between "auto_round" (raw zero points) and "auto_round:auto_gptq"
# (zero points minus one). Both conventions use the same bit layout and every stored value is legal in both, so no
# reader can tell them apart from the tensors; the README's reliability table lists this.
def _reconfigure(path, data, key):
    cfg = json.load(open(path / "config.json"))
    field, value = data.draw(st.sampled_from([
        ("bits", 2), ("bits", 3), ("bits", 8), ("bits", 16), ("group_size", 64), ("group_size", -1),
        ("group_size", 16), ("sym", True), ("packing_format", "auto_round:auto_awq"), ("packing_format", "gptq_x"),
        ("block_name_to_quantize", "model.missing"),
        ("extra_config", {"model.layers.0.mlp.up_proj": {"bits": 8}}), ("data_type", "fp4"),
    ]))
    cfg["quantization_config"][field] = value
    json.dump(cfg, open(path / "config.json", "w"))


MUTATIONS = {"truncate": _truncate, "drop": _drop, "reshape": _reshape, "retype": _retype,
             "reconfigure": _reconfigure}


@settings(max_examples=CHECKPOINT_CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), mutation=st.sampled_from(sorted(MUTATIONS)), key=st.integers(0, 10_000),
       frac=st.floats(0.0, 0.999))
def test_corrupted_checkpoints_raise_or_load_exactly(reference, tmp_path_factory, data, mutation, key, frac):
    good, ids, expected = reference
    path = tmp_path_factory.mktemp("case")
    shutil.rmtree(path)
    shutil.copytree(good, path)
    MUTATIONS[mutation](path, data, frac if mutation == "truncate" else key)
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
    except (ValueError, OSError) as err:
        assert str(err)
        return
    # it loaded: then it must be the same model (e.g. scales stored in another float dtype, same values)
    assert rel_error(logits(model, ids), expected) < 1e-4, f"{mutation} loaded silently with different weights"


def test_pickle_checkpoints_are_refused(reference, tmp_path):
    good, _, _ = reference
    shutil.copytree(good, tmp_path / "p")
    tensors = load_file(tmp_path / "p" / "model.safetensors")
    os.remove(tmp_path / "p" / "model.safetensors")
    torch.save(tensors, tmp_path / "p" / "pytorch_model.bin")
    with pytest.raises((ValueError, OSError)):
        AutoModelForCausalLM.from_pretrained(tmp_path / "p")
