"""Backends on saved tiny models (Llama / Qwen2 / OPT): every forced backend gives logits close to backend="torch",
every dtype works, saving after a repack writes the original tensors byte for byte, and unfit choices raise."""
from __future__ import annotations

import glob
import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_autoround import AutoRoundConfig
from hf_autoround.backends import available_backends
from hf_autoround.quant_linear import QuantLinear

from helpers import logits, quantize_dir, rel_error

SCHEMES = {
    "w4g32": dict(bits=4, group_size=32, sym=True),
    "w4pc-asym": dict(bits=4, group_size=-1, sym=False),
    "w4g128": dict(bits=4, group_size=128, sym=True),  # only layers with 128 inputs are quantized
    "w2g32-asym": dict(bits=2, group_size=32, sym=False),
    "w3g32": dict(bits=3, group_size=32, sym=True),
    "w8pc": dict(bits=8, group_size=-1, sym=True),
    "w8g32-asym": dict(bits=8, group_size=32, sym=False),
    "awq": dict(bits=4, group_size=32, sym=False, packing_format="auto_round:auto_awq"),
}
NATIVE = "cpu_w4a8" in available_backends()
LOW = "cpu_w4a8" if NATIVE else "cpu_int4"
FAST = {2: LOW, 3: LOW, 4: LOW, 8: "cpu_int8"}  # what "auto" picks
FORCEABLE = {2: ["cpu_int4", "cpu_w4a8"], 3: ["cpu_int4", "cpu_w4a8"], 4: ["cpu_int4", "cpu_w4a8"], 8: ["cpu_int8"]}


@pytest.fixture(scope="module")
def quantized_dirs(tiny_float_dir, tmp_path_factory):
    arch, float_dir = tiny_float_dir
    out = {}
    for key, scheme in SCHEMES.items():
        path = tmp_path_factory.mktemp(f"q_{arch}_{key}")
        quantize_dir(float_dir, str(path), **scheme)
        out[key] = str(path)
    return arch, out


def load(path, backend="auto", dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig(backend=backend),
                                                dtype=dtype)


def backends_of(model):
    return {m.kernel.name for m in model.modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("key", list(SCHEMES))
def test_forced_backends_match_torch(quantized_dirs, key, token_batch):
    arch, dirs = quantized_dirs
    ref = logits(load(dirs[key], "torch"), token_batch)
    fast = FAST[SCHEMES[key]["bits"]]
    auto = load(dirs[key])
    if not backends_of(auto):
        pytest.skip("the planner kept every layer of this model in float for this scheme")
    assert backends_of(auto) == {fast}
    assert rel_error(logits(auto, token_batch), ref) < 1e-2
    for name in FORCEABLE[SCHEMES[key]["bits"]]:
        if name not in available_backends():
            continue
        forced = load(dirs[key], name)
        assert backends_of(forced) == {name}
        assert rel_error(logits(forced, token_batch), ref) < 1e-2, name


@pytest.mark.parametrize("key", ["w4g32", "w8g32-asym", "w2g32-asym"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(quantized_dirs, key, dtype, token_batch):
    arch, dirs = quantized_dirs
    ref = logits(load(dirs[key], "torch", dtype), token_batch)
    model = load(dirs[key], dtype=dtype)
    out = logits(model, token_batch)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_error(out, ref) < 3e-2


def test_float32_stays_float32(quantized_dirs, token_batch):
    arch, dirs = quantized_dirs
    model = load(dirs["w4g32"])
    seen = []
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    logits(model, token_batch)
    assert seen and set(seen) == {torch.float32}


@pytest.mark.parametrize("key", ["w4g32", "w8g32-asym", "w8pc", "awq"])
def test_save_after_repack_is_byte_identical(quantized_dirs, key, tmp_path, token_batch):
    arch, dirs = quantized_dirs
    model = load(dirs[key])
    logits(model, token_batch)  # run the kernels once before saving
    model.save_pretrained(tmp_path)

    def tensors(path):
        out = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            out.update(load_file(f))
        return out

    original, saved = tensors(dirs[key]), tensors(str(tmp_path))
    assert original.keys() == saved.keys()
    for name, tensor in original.items():
        assert saved[name].dtype == tensor.dtype and saved[name].shape == tensor.shape, name
        assert saved[name].contiguous().view(torch.uint8).equal(tensor.contiguous().view(torch.uint8)), name


def test_log_names_backend_per_kind_of_layer(quantized_dirs, caplog):
    arch, dirs = quantized_dirs
    with caplog.at_level(logging.INFO, logger="hf_autoround"):
        load(dirs["w4g32"])
    assert f"backend {LOW} for" in caplog.text and "W4 g32 sym layers" in caplog.text
    if NATIVE:  # says why: the rule, int8 activations, and how to keep bfloat16 ones
        assert "highest priority (52) that fits: our AVX2 kernel" in caplog.text
        assert "int8 activations" in caplog.text and "backend='cpu_int4'" in caplog.text
    else:
        assert "rounded to bfloat16" in caplog.text and "backend cpu_w4a8 not available" in caplog.text


def test_forced_unknown_backend_raises(quantized_dirs):
    arch, dirs = quantized_dirs
    with pytest.raises(ValueError, match=r"backend='nope' is unknown.*cpu_int4"):
        load(dirs["w4g32"], "nope")


def test_forced_unfit_backend_raises(quantized_dirs):
    arch, dirs = quantized_dirs
    with pytest.raises(ValueError, match=r"backend='cpu_int8' cannot run W4 g32 sym .*4-bit not in \[8\].*"
                                         r"backends that can: \[.*'cpu_int4'.*'torch'\]"):
        load(dirs["w4g32"], "cpu_int8")


@pytest.mark.skipif("gptqmodel_marlin" in available_backends(), reason="gptqmodel is installed")
def test_forced_unavailable_backend_raises(quantized_dirs):
    arch, dirs = quantized_dirs
    with pytest.raises(ValueError, match=r"backend='gptqmodel_marlin' is not available here \(it needs gptqmodel\)"
                                         r".*'cpu_int4'.*'torch'\]"):
        load(dirs["w4g32"], "gptqmodel_marlin")
