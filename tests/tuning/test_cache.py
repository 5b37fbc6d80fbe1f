"""The block-input cache: what the first block is called with, per sample, and batching it back."""
from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, build_tiny_model
from tuning_helpers import one_thread  # noqa: F401  (autouse)

from hf_autoround.layers import detect_block_names
from hf_autoround.tuning.cache import capture_block_inputs, forward_block, run_block
from hf_autoround.tuning.data import CalibrationData


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_and_unpadded_samples_batch_together(arch, attn):
    """An unpadded sample reaches the block with no mask, a padded one with a 4-D mask: batched, both must run as
    they run alone."""
    model = build_tiny_model(arch)
    model.set_attn_implementation(attn)
    block = model.get_submodule(detect_block_names(model)[0])[0]
    torch.manual_seed(5)
    ids = torch.randint(0, 256, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, 11:] = 0
    mixed = capture_block_inputs(model, block, CalibrationData(ids, mask))
    assert "attention_mask" in mixed.per_sample
    with torch.no_grad():
        together = forward_block(block, mixed, mixed.hidden, torch.tensor([0, 1]), torch.float32)
        for i in (0, 1):
            alone = capture_block_inputs(model, block, CalibrationData(ids[i:i + 1], mask[i:i + 1]))
            single = forward_block(block, alone, alone.hidden, torch.arange(1), torch.float32)
            assert torch.allclose(together[i], single[0], atol=1e-5), i


def test_selected_inputs_run_like_the_same_samples_of_the_whole_set():
    model = build_tiny_model("llama")
    torch.manual_seed(5)
    mask = torch.ones(6, 16, dtype=torch.long)
    mask[1, 12:] = 0
    mask[4, 9:] = 0
    inputs = capture_block_inputs(model, model.model.layers[0], CalibrationData(torch.randint(0, 256, (6, 16)), mask))
    idx = torch.tensor([1, 4, 5])
    part = inputs.select(idx)
    assert part.nsamples == 3 and torch.equal(part.token_mask, mask[idx])
    assert torch.equal(part.hidden, inputs.hidden[idx])
    block = model.model.layers[0]
    with torch.no_grad():
        whole = forward_block(block, inputs, inputs.hidden, idx, torch.float32)
        alone = forward_block(block, part, part.hidden, torch.arange(3), torch.float32)
    assert torch.equal(alone, whole)


@pytest.mark.parametrize("batch", [1, 4, 6])
def test_run_block_over_its_own_input_equals_a_fresh_output(batch):
    """Written over ``hidden`` itself, batch after batch, the outputs are those of a pass into a new tensor."""
    model = build_tiny_model("llama")
    torch.manual_seed(5)
    inputs = capture_block_inputs(model, model.model.layers[0], CalibrationData(torch.randint(0, 256, (6, 16))))
    block = model.model.layers[0]
    fresh = run_block(block, inputs, inputs.hidden, batch, torch.float32)
    hidden = inputs.hidden.clone()
    over = run_block(block, inputs, hidden, batch, torch.float32, into=hidden)
    assert over is hidden and fresh is not inputs.hidden
    assert torch.equal(over, fresh)


def test_run_block_allocates_when_into_does_not_fit():
    model = build_tiny_model("llama")
    inputs = capture_block_inputs(model, model.model.layers[0], CalibrationData(torch.randint(0, 256, (2, 8))))
    block = model.model.layers[0]
    other = inputs.hidden.to(torch.float16)
    out = run_block(block, inputs, inputs.hidden, 2, torch.float32, into=other)
    assert out is not other and out.dtype == inputs.hidden.dtype
    assert torch.equal(other, inputs.hidden.to(torch.float16))  # left as it was
