"""The fused fake-quantiser gives exactly qdq's values and V gradients, and scale gradients to fp16 rounding."""
from __future__ import annotations

import pytest
import torch
from tuning_helpers import one_thread  # noqa: F401  (autouse)

from hf_autoround.qdq import qdq
from hf_autoround.scheme import QuantScheme
from hf_autoround.tuning.fakequant import GroupedWeight, fake_quant


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(2, 32, False), QuantScheme(3, -1, False),
                                    QuantScheme(4, 48, False), QuantScheme(8, 64, True)],
                         ids=lambda s: s.describe())
def test_matches_qdq(scheme):
    torch.manual_seed(0)
    w = torch.randn(24, 100)  # 100 is not a multiple of 32 / 48 / 64: a zero-padded last group
    shape = (24, scheme.n_groups(100))
    v = torch.rand(*shape, scheme.group_len(100)) - 0.5
    mn, mx = torch.rand(shape) * 0.5 + 0.5, torch.rand(shape) * 0.5 + 0.5
    grad_out = torch.randn(24, 100)
    ref = [t.clone().requires_grad_(True) for t in (v, mn, mx)]
    (qdq(w, scheme, *ref) * grad_out).sum().backward()
    ours = [t.clone().requires_grad_(True) for t in (v, mn, mx)]
    out = fake_quant(GroupedWeight.from_weight(w, scheme), scheme, *ours)
    (out * grad_out).sum().backward()
    assert torch.equal(out, qdq(w, scheme, v, mn, mx))
    assert torch.equal(ours[0].grad, ref[0].grad)
    for a, b in zip(ours[1:], ref[1:]):  # autograd rounds the scale gradient through fp16; ours stays fp32
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-3, atol=1e-3 * b.grad.abs().max().item())
