"""lmech.dpo against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from lmech.dpo import dpo_loss, sequence_logprob
from lmech.errors import ConfigError


def test_dpo_loss_matches_the_formula_written_out():
    gen = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=gen, dtype=torch.float64) * 5 for _ in range(4))
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    direct = []
    for i in range(7):
        z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
        direct.append(-math.log(1.0 / (1.0 + math.exp(-z))))
    assert abs(float(out.loss) - sum(direct) / 7) < 1e-12
    torch.testing.assert_close(out.chosen_reward, beta * (pc - rc))
    torch.testing.assert_close(out.margin, beta * (pc - rc) - beta * (pr - rr))


def test_dpo_gradient_flows_to_the_policy_only_and_log2_at_the_reference():
    pc = torch.randn(4, requires_grad=True)
    rc = pc.detach().clone().requires_grad_(True)
    out = dpo_loss(pc, pc.detach(), rc, pc.detach(), beta=2.0)
    assert abs(float(out.loss.detach()) - math.log(2)) < 1e-6
    out.loss.backward()
    assert rc.grad is None and pc.grad is not None
    # d/d(pc_i) of -mean log sigma(beta (pc - ref)) at margin 0 = -beta * 0.5 / B
    torch.testing.assert_close(pc.grad, torch.full((4,), -2.0 * 0.5 / 4))


def test_sequence_logprob_is_the_sum_of_masked_token_logprobs():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 6, generator=gen)
    y = torch.randint(0, 6, (3, 5), generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1]] * 3)
    got = sequence_logprob(logits, y, mask)
    for b in range(3):
        want = sum(math.log(torch.softmax(logits[b, t], -1)[y[b, t]].item()) for t in range(2, 5))
        assert abs(float(got[b]) - want) < 1e-5


def test_bad_input():
    z = torch.zeros(2)
    with pytest.raises(ConfigError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ConfigError, match="one shape"):
        dpo_loss(z, z, z, torch.zeros(3))
    with pytest.raises(ConfigError, match="logits"):
        sequence_logprob(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))
