"""A model dispatched by accelerate with blocks, embeddings and head offloaded to disk tunes to exactly the
checkpoint of the same model in memory; devices that are not there are refused by name."""
from __future__ import annotations

import os

import pytest
import torch
from conftest import build_tiny_model
from transformers import AutoModelForCausalLM
from tuning_helpers import calib, one_thread  # noqa: F401  (autouse)

from hf_autoround import AutoRound
from hf_autoround.quant_linear import QuantLinear
from hf_autoround.tuning.offload import is_offloaded

pytest.importorskip("accelerate")



def settings(**kw):
    base = dict(bits=2, group_size=32, iters=6, lr=0.05, nsamples=8, seqlen=24, batch_size=4, dataset=calib(),
                progress=False, quant_lm_head=True)
    base.update(kw)
    return base


def test_disk_offloaded_model_tunes_to_the_same_checkpoint(tmp_path):
    src = str(tmp_path / "src")
    build_tiny_model("llama").save_pretrained(src)
    AutoRound(AutoModelForCausalLM.from_pretrained(src).eval(), None, **settings()) \
        .quantize_and_save(str(tmp_path / "normal"))

    device_map = {"model.embed_tokens": "disk", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "disk"}
    model = AutoModelForCausalLM.from_pretrained(src, device_map=device_map,
                                                 offload_folder=str(tmp_path / "offload")).eval()
    assert is_offloaded(model) and model.model.layers[1].mlp.up_proj.weight.is_meta
    AutoRound(model, None, device_map=device_map, **settings()).quantize_and_save(str(tmp_path / "offloaded"))

    assert not any(t.is_meta for t in model.state_dict().values()) and not is_offloaded(model)
    assert isinstance(model.lm_head, QuantLinear)
    for name in sorted(os.listdir(tmp_path / "normal")):
        assert (tmp_path / "normal" / name).read_bytes() == (tmp_path / "offloaded" / name).read_bytes(), name
    normal = AutoModelForCausalLM.from_pretrained(tmp_path / "normal").eval()
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():  # the tuned model still runs through the hooks that remain (top-level device moves)
        torch.testing.assert_close(model(x).logits, normal(x).logits, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_by_name():
    with pytest.raises(ValueError, match="device='cuda:0': no cuda device is available"):
        AutoRound(build_tiny_model("llama"), None, device="cuda:0", **settings(iters=1)).quantize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_is_accepted_and_tuning_stays_on_the_cpu():
    ar = AutoRound(build_tiny_model("llama"), None, device="cuda", **settings(iters=1))
    ar.quantize()
    assert all(t.device.type == "cpu" for t in ar.model.state_dict().values())
