"""Never a silent wrong load: broken or contradictory checkpoints raise, naming the tensor or key."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import build_tiny_model
from helpers import quantize_dir

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    build_tiny_model("llama").save_pretrained(root / "f")
    quantize_dir(root / "f", root / "q", bits=4, group_size=32, sym=True)
    return root / "q"


def _copy(good_dir, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(good_dir, target)
    return target


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    cfg = json.load(open(path / "config.json"))
    cfg["quantization_config"].update(changes)
    json.dump(cfg, open(path / "config.json", "w"))


def test_good_checkpoint_loads(good_dir):
    AutoModelForCausalLM.from_pretrained(good_dir)


@pytest.mark.parametrize("suffix", ["qweight", "qzeros", "scales"])
def test_missing_tensor(good_dir, tmp_path, suffix):
    path = _copy(good_dir, tmp_path)
    _edit_tensors(path, lambda t: t.pop(f"{LAYER}.{suffix}"))
    with pytest.raises(ValueError, match=f"{LAYER}.{suffix} is missing"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("suffix", ["qweight", "qzeros", "scales"])
def test_misshaped_tensor(good_dir, tmp_path, suffix):
    path = _copy(good_dir, tmp_path)

    def shrink(t):
        t[f"{LAYER}.{suffix}"] = t[f"{LAYER}.{suffix}"][:-1].clone()

    _edit_tensors(path, shrink)
    with pytest.raises(ValueError, match=rf"{LAYER}.{suffix}: shape"):
        AutoModelForCausalLM.from_pretrained(path)


def test_float_scales_of_wrong_kind(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)

    def to_int(t):
        t[f"{LAYER}.scales"] = t[f"{LAYER}.scales"].to(torch.int32)

    _edit_tensors(path, to_int)
    with pytest.raises(ValueError, match=rf"{LAYER}.scales: dtype I32"):
        AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.parametrize("changes,needle", [
    ({"bits": 2}, "qweight: shape"),
    ({"bits": 8}, "qweight: shape"),
    ({"group_size": 64}, "qzeros: shape"),
    ({"packing_format": "auto_round:auto_awq"}, "qweight: shape"),
    ({"packing_format": "zip"}, "packing_format='zip'"),
    ({"bits": 5}, "bits=5"),
    ({"block_name_to_quantize": "model.nothing"}, "model.nothing"),
])
def test_config_contradicting_the_tensors(good_dir, tmp_path, changes, needle):
    path = _copy(good_dir, tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        AutoModelForCausalLM.from_pretrained(path)


def test_layer_the_config_keeps_float_but_the_file_quantizes(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)
    _edit_config(path, extra_config={LAYER: {"bits": 16}})
    with pytest.raises(ValueError, match=f"{LAYER}.qweight is in the checkpoint"):
        AutoModelForCausalLM.from_pretrained(path)


def test_act_order_g_idx_is_refused(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)

    def add_g_idx(t):
        t[f"{LAYER}.g_idx"] = torch.randperm(64).to(torch.int32) // 32

    _edit_tensors(path, add_g_idx)
    with pytest.raises(ValueError, match="act-order"):
        AutoModelForCausalLM.from_pretrained(path)


def test_trivial_g_idx_is_accepted(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)

    def add_g_idx(t):
        t[f"{LAYER}.g_idx"] = (torch.arange(64) // 32).to(torch.int32)

    _edit_tensors(path, add_g_idx)
    AutoModelForCausalLM.from_pretrained(path)


def test_asymmetric_tensors_under_a_symmetric_config_are_refused(tmp_path):
    build_tiny_model("llama").save_pretrained(tmp_path / "f")
    quantize_dir(tmp_path / "f", tmp_path / "q", bits=4, group_size=32, sym=False)
    _edit_config(tmp_path / "q", sym=True)
    with pytest.raises(ValueError, match="config says sym=True but the zero points"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_gptq_v1_sym_checkpoint_read_as_raw_zero_points_is_refused(good_dir, tmp_path):
    path = _copy(good_dir, tmp_path)
    _edit_config(path, packing_format="auto_round")  # stored 7s would read as zero point 7, not 8
    with pytest.raises(ValueError, match="zero points are not all 8"):
        AutoModelForCausalLM.from_pretrained(path)
