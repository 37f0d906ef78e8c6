"""Group advantages and the GRPO PPO-clip loss, against numbers worked out by hand."""

import math

import pytest
import torch

from megatron_r1v3.rl.advantages import group_advantages, keep_informative_groups, zero_variance_groups
from megatron_r1v3.rl.loss import (
    PROB_ERROR_ALARM,
    aggregation_count,
    grpo_loss,
    grpo_loss_pieces,
    metrics_from_vector,
    stale_weights_suspected,
)

# ---------------------------------------------------------------- advantages


def test_group_advantages_sample_and_population_std():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    # mean 0.5, deviations ±0.5; sample std = sqrt(4 * 0.25 / 3) = 1/sqrt(3); population std = 0.5
    adv, _ = group_advantages(r, eps=0.0)
    s = 0.5 * math.sqrt(3.0)
    assert torch.allclose(adv, torch.tensor([[s, -s, -s, s]]))
    adv_pop, _ = group_advantages(r, eps=0.0, unbiased=False)
    assert torch.allclose(adv_pop, torch.tensor([[1.0, -1.0, -1.0, 1.0]]))
    adv_raw, _ = group_advantages(r, normalize_std=False)
    assert torch.allclose(adv_raw, torch.tensor([[0.5, -0.5, -0.5, 0.5]]))


def test_zero_variance_groups_get_exact_zero_and_are_counted():
    g = 32
    same = torch.full((g,), 0.8) + torch.full((g,), 0.2)  # the mean of 32 equal floats may round; A must be 0
    r = torch.stack([same, torch.zeros(g), torch.arange(g, dtype=torch.float32) % 2])
    adv, stats = group_advantages(r)
    assert torch.equal(adv[:2], torch.zeros(2, g))
    assert (adv[2] != 0).all()
    assert stats.num_groups == 3 and stats.zero_variance_groups == 2
    assert stats.zero_variance_fraction == pytest.approx(2 / 3)
    assert stats.zero_advantage_fraction == pytest.approx(2 / 3)
    assert stats.reward_mean == pytest.approx(float(r.mean()))
    assert stats.reward_std == pytest.approx(float(r.std(correction=0)))
    assert stats.as_dict()["adv/zero_variance_groups"] == 2.0
    assert torch.equal(zero_variance_groups(r), torch.tensor([True, True, False]))
    assert torch.equal(keep_informative_groups(r), torch.tensor([False, False, True]))


def test_group_of_one_and_bad_input():
    adv, stats = group_advantages(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(adv, torch.zeros(2, 1)) and stats.zero_variance_groups == 2
    with pytest.raises(ValueError):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([[1.0, float("nan")]]))


# ---------------------------------------------------------------- loss: the hand-computed batch
#
# Two sequences, T = 3, logp_old = 0 so ρ = exp(logp_new); ε = 0.2 (clip range [0.8, 1.2]).
#   seq 0, A = +1, mask 1 1 1, ρ = 1.1, 1.5, 0.5
#       min(1.1·1, 1.1·1) = 1.1   min(1.5, 1.2) = 1.2 (clipped high)   min(0.5, 0.8) = 0.5 (A>0, low: not clipped)
#       token losses −1.1, −1.2, −0.5;  sum −2.8
#   seq 1, A = −2, mask 1 1 0, ρ = 0.5, 1.5, (padding: NaN)
#       min(−1.0, 0.8·−2 = −1.6) = −1.6 (clipped low)   min(−3.0, 1.2·−2 = −2.4) = −3.0 (A<0, high: not clipped)
#       token losses 1.6, 3.0;  sum 4.6
#   token-mean           (−2.8 + 4.6) / 5                = 0.36
#   seq-mean-token-mean  (−2.8/3 + 4.6/2) / 2 = (−0.93333 + 2.3) / 2 = 0.683333…
#   seq-mean-token-sum   (−2.8 + 4.6) / 2                = 0.9
#   clipfrac_high = clipfrac_low = 1/5;  ratio_mean = (1.1 + 1.5 + 0.5 + 0.5 + 1.5) / 5 = 1.02
#   prob_error = mean(max(ρ, 1/ρ)) = (1.1 + 1.5 + 2 + 2 + 1.5) / 5 = 1.62
#   approx_kl = mean(ρ − 1 − ln ρ)


def hand_batch():
    ratios = torch.tensor([[1.1, 1.5, 0.5], [0.5, 1.5, 1.0]])
    logp_new = ratios.log()
    logp_new[1, 2] = float("nan")  # padding may hold garbage
    logp_new.requires_grad_(True)
    logp_old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logp_new, logp_old, adv, mask


@pytest.mark.parametrize(
    "agg, expected",
    [("token-mean", 0.36), ("seq-mean-token-mean", (-2.8 / 3 + 2.3) / 2), ("seq-mean-token-sum", 0.9)],
)
def test_hand_computed_loss(agg, expected):
    logp_new, logp_old, adv, mask = hand_batch()
    loss, m = grpo_loss(logp_new, logp_old, adv, mask, agg=agg)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["actor/loss"] == pytest.approx(expected, abs=1e-6)
    assert m["actor/clipfrac_high"] == pytest.approx(0.2)
    assert m["actor/clipfrac_low"] == pytest.approx(0.2)
    assert m["actor/ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    assert m["actor/prob_error"] == pytest.approx(1.62, abs=1e-6)
    assert m["actor/prob_error_alarm"] == 1.0
    assert m["actor/pg_loss"] == pytest.approx(0.36, abs=1e-6)  # metrics are token means whatever agg is
    kl = sum(r - 1 - math.log(r) for r in (1.1, 1.5, 0.5, 0.5, 1.5)) / 5
    assert m["actor/approx_kl"] == pytest.approx(kl, abs=1e-6)
    assert m["actor/num_tokens"] == 5.0
    loss.backward()
    assert torch.isfinite(logp_new.grad).all()
    assert logp_new.grad[1, 2] == 0.0


def test_hand_computed_gradients():
    logp_new, logp_old, adv, mask = hand_batch()
    loss, _ = grpo_loss(logp_new, logp_old, adv, mask, agg="token-mean")
    loss.backward()
    # unclipped token: ℓ = −ρA, dℓ/dlogp = −ρA, divided by the 5 tokens; clipped tokens: 0
    expected = torch.tensor([[-1.1, 0.0, -0.5], [0.0, 3.0, 0.0]]) / 5
    assert torch.allclose(logp_new.grad, expected, atol=1e-6)


@pytest.mark.parametrize(
    "ratio, adv, clipped, grad_sign",
    [
        (1.5, 1.0, "high", 0),  # above 1+ε with A>0: clipped, no gradient
        (0.5, -1.0, "low", 0),  # below 1−ε with A<0: clipped, no gradient
        (1.5, -1.0, None, 1),  # above 1+ε with A<0: not clipped, pushes logp down
        (0.5, 1.0, None, -1),  # below 1−ε with A>0: not clipped, pushes logp up
        (1.0, 1.0, None, -1),  # on-policy, good answer: raise its probability
        (1.0, -1.0, None, 1),  # on-policy, bad answer: lower it
        (1.1, -1.0, None, 1),  # inside the clip range
    ],
)
def test_clip_cases_and_gradient_sign(ratio, adv, clipped, grad_sign):
    logp_new = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, m = grpo_loss(logp_new, torch.zeros(1, 1), torch.tensor([adv]), torch.ones(1, 1))
    loss.backward()
    assert m["actor/clipfrac_high"] == (1.0 if clipped == "high" else 0.0)
    assert m["actor/clipfrac_low"] == (1.0 if clipped == "low" else 0.0)
    g = logp_new.grad.item()
    assert (g > 0) - (g < 0) == grad_sign


def test_asymmetric_clip_higher():
    logp_new = torch.tensor([[math.log(1.25)]], requires_grad=True)
    loss, m = grpo_loss(logp_new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and m["actor/clipfrac_high"] == 0.0
    loss, m = grpo_loss(logp_new, torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1), eps_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and m["actor/clipfrac_high"] == 1.0


def test_zero_variance_groups_give_no_gradient():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    adv, _ = group_advantages(rewards)
    logp_new = torch.randn(4, 5, requires_grad=True)
    loss, _ = grpo_loss(logp_new, logp_new.detach() - 0.1, adv.reshape(-1), torch.ones(4, 5))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp_new.grad, torch.zeros(4, 5))


def test_kl_and_entropy_terms():
    # logp_new = logp_old = 0 (ρ = 1, A = 0: no policy term); ref − new = ln 2 → k3 = 2 − ln 2 − 1 = 0.306853
    logp_new = torch.zeros(1, 2, requires_grad=True)
    ref = torch.full((1, 2), math.log(2.0))
    ent = torch.tensor([[0.5, 1.5]], requires_grad=True)
    mask, adv = torch.ones(1, 2), torch.zeros(1)
    k3 = 1.0 - math.log(2.0)
    loss, m = grpo_loss(
        logp_new, torch.zeros(1, 2), adv, mask, logp_ref=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01
    )
    # loss = 0.1·k3 − 0.01·mean(0.5, 1.5) = 0.0306853 − 0.01
    assert loss.item() == pytest.approx(0.1 * k3 - 0.01, abs=1e-6)
    assert m["actor/kl_ref"] == pytest.approx(k3, abs=1e-6) and m["actor/entropy"] == pytest.approx(1.0)
    loss.backward()
    # d k3 / d new = −exp(ref − new) + 1 = −1: the KL pulls logp_new up towards the reference
    assert torch.allclose(logp_new.grad, torch.full((1, 2), 0.1 * -1.0 / 2))
    assert torch.allclose(ent.grad, torch.full((1, 2), -0.01 / 2))
    # without coefficients the terms are logged but do not enter the loss
    loss0, m0 = grpo_loss(logp_new, torch.zeros(1, 2), adv, mask, logp_ref=ref, entropy=ent)
    assert loss0.item() == 0.0 and m0["actor/kl_ref"] == pytest.approx(k3, abs=1e-6)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_pieces_summed_over_microbatches_equal_the_whole_batch(agg):
    g = torch.Generator().manual_seed(0)
    b, t = 6, 7
    logp_old = -torch.rand(b, t, generator=g)
    base = logp_old + 0.3 * torch.randn(b, t, generator=g)
    adv = torch.randn(b, generator=g)
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    mask[4] = 0  # an empty sequence counts in no mode

    whole = base.clone().requires_grad_(True)
    loss, metrics = grpo_loss(whole, logp_old, adv, mask, agg=agg)
    loss.backward()

    split = base.clone().requires_grad_(True)
    parts = [slice(0, 2), slice(2, 6)]  # e.g. two microbatches, or two DP ranks
    total = sum(aggregation_count(mask[s], agg) for s in parts)  # all-reduced before the backward
    vec = 0
    for s in parts:
        p = grpo_loss_pieces(split[s], logp_old[s], adv[s], mask[s], agg=agg)
        assert torch.equal(p.count, aggregation_count(mask[s], agg))
        (p.loss_sum / total).backward()
        vec = vec + p.metric_vector()
    assert torch.allclose(split.grad, whole.grad, atol=1e-7)
    reduced = metrics_from_vector(vec)
    for k, v in reduced.items():
        assert v == pytest.approx(metrics[k], abs=1e-6), k
    assert int(total) == (int(mask.sum()) if agg == "token-mean" else 5)


def test_empty_batch_and_bad_arguments():
    loss, m = grpo_loss(torch.zeros(2, 3, requires_grad=True), torch.zeros(2, 3), torch.ones(2), torch.zeros(2, 3))
    assert loss.item() == 0.0 and m["actor/num_tokens"] == 0.0 and m["actor/prob_error"] == 0.0
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3), agg="sum")
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3), torch.ones(2, 3))


def test_stale_weights_guard():
    assert PROB_ERROR_ALARM == 1.05
    assert not stale_weights_suspected(1.04) and stale_weights_suspected(1.06)
    # trainer and rollout agree to 1%: no alarm
    logp = -torch.rand(3, 4)
    _, m = grpo_loss(logp + 0.01, logp, torch.ones(3), torch.ones(3, 4))
    assert m["actor/prob_error"] == pytest.approx(math.exp(0.01), abs=1e-5)
    assert m["actor/prob_error_alarm"] == 0.0
