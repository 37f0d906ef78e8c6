"""Rollout correction (issue 15): TIS / MIS weights on a hand-computed example, their effect on the loss and its
gradient, and the config checks."""

import math

import pytest
import torch

from megatron_r1v3.config import RunConfig, field_errors
from megatron_r1v3.rl.loss import grpo_loss, rollout_correction_weights

# w = pi_old / pi_rollout per token: 0.25, 1.0, 1.5, 3.0 (valid), then one padding position
W = [0.25, 1.0, 1.5, 3.0, 7.0]
OLD = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.6, 0.7]]))
ROLLOUT = OLD - torch.log(torch.tensor([W]))
MASK = torch.tensor([[1, 1, 1, 1, 0]])


@pytest.mark.parametrize("mode, weights, corrected", [
    ("none", [1.0, 1.0, 1.0, 1.0, 1.0], [False] * 5),
    ("tis", [0.25, 1.0, 1.5, 2.0, 1.0], [False, False, False, True, False]),  # capped at C = 2
    ("mis", [0.0, 1.0, 1.0, 0.0, 1.0], [True, False, False, True, False]),  # outside [1/2, 2]: dropped
])
def test_weights_by_hand(mode, weights, corrected):
    weight, w, flag = rollout_correction_weights(OLD, ROLLOUT, MASK, mode, cap=2.0)
    assert weight[0].tolist() == pytest.approx(weights)
    assert w[0, :4].tolist() == pytest.approx(W[:4])  # padding's raw ratio is not computed (1)
    assert flag[0].tolist() == corrected


def test_weights_scale_each_tokens_policy_gradient():
    """new = old (ratio 1, no clipping), advantage +1: token-mean loss = -(Σ weights)/4 and d loss / d logp_t =
    -weight_t / 4, so a capped token pushes with C and a masked one not at all."""
    adv = torch.tensor([1.0])
    for mode, total in (("none", 4.0), ("tis", 0.25 + 1.0 + 1.5 + 2.0), ("mis", 2.0)):
        weight, _, _ = rollout_correction_weights(OLD, ROLLOUT, MASK, mode, cap=2.0)
        new = OLD.clone().requires_grad_(True)
        loss, metrics = grpo_loss(new, OLD, adv, MASK, is_weight=weight)
        assert float(loss) == pytest.approx(-total / 4)
        loss.backward()
        assert new.grad[0, :4].tolist() == pytest.approx([-x / 4 for x in weight[0, :4].tolist()])
        assert new.grad[0, 4] == 0
        assert metrics["actor/ratio_mean"] == pytest.approx(1.0)


def test_garbage_rollout_logprobs_cannot_make_nan():
    bad = ROLLOUT.clone()
    bad[0, 1], bad[0, 4] = -math.inf, math.nan
    weight, w, _ = rollout_correction_weights(OLD, bad, MASK, "tis", cap=2.0)
    assert torch.isfinite(weight).all() and weight[0, 1] == 2.0


def test_config_checks():
    cfg = RunConfig()
    cfg.rl.rollout_correction, cfg.rl.old_logprobs = "tis", "rollout"
    assert any("rl.rollout_correction=tis needs rl.old_logprobs=recompute" in e for e in field_errors(cfg))
    cfg.rl.rollout_correction, cfg.rl.rollout_correction_cap = "clip", 0.5
    errors = " ".join(field_errors(cfg))
    assert "rl.rollout_correction='clip'" in errors and "rl.rollout_correction_cap=0.5" in errors
