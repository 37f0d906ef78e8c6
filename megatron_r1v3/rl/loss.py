"""Token-level PPO-clip loss for GRPO (spec §3), with its aggregation split into (sum, count) pieces.

Per valid token t of sequence i, with ρ = exp(logp_new − logp_old) and the sequence's advantage A_i:
    ℓ_t = −min(ρ·A_i, clip(ρ, 1 − ε_low, 1 + ε_high)·A_i) + kl_coef·k3_t − entropy_coef·H_t
    k3_t = exp(ref − new) − (ref − new) − 1     (KL to the reference policy; R1V3 uses none: kl_coef = 0)
Aggregation (`agg`; R1V3: token mean per sequence, then mean over sequences):
    token-mean            Σ_all ℓ / #valid tokens                       (long answers weigh more)
    seq-mean-token-mean   mean over sequences of (Σ_i ℓ / #valid_i)      (every response weighs the same)
    seq-mean-token-sum    mean over sequences of Σ_i ℓ                   (scales with length)
Sequences without a valid token count in none of them.

Splitting a step across microbatches and data-parallel ranks: the step's loss is Σ loss_sum / Σ count over every
microbatch of every rank (`grpo_loss_pieces`). `count` depends only on the masks, so it is known before the
backward pass:
  a) megatron-core with `calculate_per_token_loss=True`: return `(pieces.loss_sum, pieces.count, reduced)` from the
     loss function; megatron sums the counts over microbatches and DP(×CP) ranks and scales the gradients by
     1 / total (finalize_model_grads) — exactly this loss;
  b) otherwise: `total = all_reduce_sum(Σ_microbatches aggregation_count(mask, agg))` first, then backprop
     `pieces.loss_sum / total`, times the DP size if the DP gradient reduction averages (megatron's default), and
     undo any 1 / num_microbatches the schedule applies.
Metrics: all-reduce (sum) `pieces.metric_vector()` over microbatches and ranks, then `metrics_from_vector`.
The two seq-mean modes need whole sequences on a rank: no context-parallel split, no packed rows.

Rollout correction (`rollout_correction_weights`, rl.rollout_correction): the engine that sampled a token is not the
trainer (bf16 vLLM kernels vs fp32/bf16 Megatron; or an older policy for buffer replays). With w_t = π_old_train(t)
/ π_rollout(t) per token, TIS multiplies the token's policy-gradient term by min(w_t, C) (truncated importance
sampling); MIS keeps the term only where 1/C ≤ w_t ≤ C (masked importance sampling). The weights are constants
(no gradient); masked tokens stay in the aggregation's count (it is fixed before the backward pass), so they add 0.

Padding positions may hold anything (even NaN / −inf logprobs): they are masked with `where`, never multiplied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
AGGREGATIONS: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")

# mean(exp(|logp_train − logp_rollout|)) above this means the trainer and the rollout engine disagree on the
# policy: suspect stale or wrongly pushed weights (the standing guard from NeMo-RL practice; style.md).
PROB_ERROR_ALARM = 1.05
# |log ρ| is clamped here before exp so a garbage logprob cannot make inf·0 = NaN in the backward pass.
MAX_LOG_RATIO = 20.0

METRIC_KEYS: tuple[str, ...] = (
    "pg_loss",  # −min(ρA, clip(ρ)A), token mean
    "clipfrac_low",  # A < 0 and ρ < 1 − ε_low: the clip binds, no gradient
    "clipfrac_high",  # A > 0 and ρ > 1 + ε_high
    "approx_kl",  # k3 estimate of KL(old || new): (ρ − 1) − log ρ
    "ratio_mean",
    "prob_error",  # mean(exp(|logp_new − logp_old|)); alarm above PROB_ERROR_ALARM
    "kl_ref",  # k3 to the reference policy (0 without logp_ref)
    "entropy",  # mean token entropy (0 without entropy)
)


@dataclass
class LossPieces:
    """One microbatch's share of the loss and metrics, to be summed across microbatches / ranks before dividing."""

    loss_sum: torch.Tensor  # differentiable scalar: Σ over aggregation units of their loss
    count: torch.Tensor  # int64 scalar: aggregation units (valid tokens, or sequences with a valid token)
    num_tokens: torch.Tensor  # int64 scalar: valid tokens, the denominator of every metric
    metric_sums: dict[str, torch.Tensor]  # detached float sums over valid tokens, keys METRIC_KEYS

    def metric_vector(self) -> torch.Tensor:
        """float64 [1 + len(METRIC_KEYS)]: num_tokens then the sums, ready for one all-reduce(SUM)."""
        vals = [self.num_tokens.to(torch.float64)] + [self.metric_sums[k].to(torch.float64) for k in METRIC_KEYS]
        return torch.stack(vals)


def metrics_from_vector(vec: torch.Tensor, prefix: str = "actor/") -> dict[str, float]:
    """Token means from a (reduced) `metric_vector`, plus `num_tokens` and the `prob_error_alarm` flag (0/1)."""
    n = float(vec[0])
    out = {prefix + k: float(vec[i + 1]) / max(n, 1.0) for i, k in enumerate(METRIC_KEYS)}
    out[prefix + "num_tokens"] = n
    out[prefix + "prob_error_alarm"] = float(stale_weights_suspected(out[prefix + "prob_error"]))
    return out


def stale_weights_suspected(prob_error: float) -> bool:
    """True when the train-vs-rollout probability error exceeds PROB_ERROR_ALARM (tokens were seen: > 0)."""
    return prob_error > PROB_ERROR_ALARM


def _check_agg(agg: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def aggregation_count(mask: torch.Tensor, agg: Aggregation = "token-mean") -> torch.Tensor:
    """int64 scalar: how many units `agg` averages over in this [B, T] mask (tokens or non-empty sequences)."""
    _check_agg(agg)
    valid = mask != 0
    if agg == "token-mean":
        return valid.sum().to(torch.int64)
    return (valid.sum(dim=1) > 0).sum().to(torch.int64)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: Aggregation) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of a [B, T] per-token quantity under `agg`; the mean is sum / max(count, 1)."""
    _check_agg(agg)
    valid = mask != 0
    x = torch.where(valid, per_token, torch.zeros_like(per_token))
    count = aggregation_count(mask, agg)
    if agg == "token-mean":
        return x.sum(), count
    n_seq = valid.sum(dim=1)
    per_seq = x.sum(dim=1)
    if agg == "seq-mean-token-mean":
        per_seq = per_seq / n_seq.clamp_min(1).to(per_seq.dtype)
    return per_seq.sum(), count  # empty sequences contribute 0 to the sum and are not counted


def _check_shapes(logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor):
    if logp_new.dim() != 2 or logp_old.shape != logp_new.shape or mask.shape != logp_new.shape:
        raise ValueError(
            f"logp_new, logp_old and mask must share one [B, T] shape, got {tuple(logp_new.shape)}, "
            f"{tuple(logp_old.shape)}, {tuple(mask.shape)}"
        )
    if advantages.shape != logp_new.shape[:1]:
        raise ValueError(f"advantages must be [B]={logp_new.shape[0]}, got {tuple(advantages.shape)}")


CORRECTIONS: tuple[str, ...] = ("none", "tis", "mis")


def rollout_correction_weights(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, mode: str,
                               cap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token weights, raw ratios w = π_old/π_rollout, corrected flags) for `mode` none | tis | mis with cap C.

    tis: min(w, C); mis: 1 where 1/C ≤ w ≤ C else 0; none: 1. `corrected` marks valid tokens whose weight is not w
    (TIS capped, MIS masked). Padding positions get weight 1 and are never flagged."""
    if mode not in CORRECTIONS:
        raise ValueError(f"rollout correction must be one of {CORRECTIONS}, got {mode!r}")
    valid = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=logp_old.device)
    log_w = torch.where(valid, logp_old.detach().float() - logp_rollout.detach().float(), zero)
    w = torch.exp(log_w.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    one = torch.ones_like(w)
    if mode == "tis":
        weight, corrected = torch.minimum(w, torch.full_like(w, cap)), w > cap
    elif mode == "mis":
        keep = (w >= 1.0 / cap) & (w <= cap)
        weight, corrected = keep.float(), ~keep
    else:
        weight, corrected = one, torch.zeros_like(valid)
    return torch.where(valid, weight, one), w, corrected & valid


def grpo_loss_pieces(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: Aggregation = "token-mean",
    logp_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weight: torch.Tensor | None = None,
) -> LossPieces:
    """The (sum, count) pieces of `grpo_loss` for one microbatch; gradients flow through logp_new (and entropy).

    `is_weight` [B, T]: the rollout-correction weight of each token's policy-gradient term (a constant)."""
    _check_shapes(logp_new, logp_old, advantages, mask)
    valid = mask != 0
    zero = torch.zeros((), dtype=torch.float32, device=logp_new.device)
    new = logp_new.float()
    log_ratio = torch.where(valid, new - logp_old.detach().float(), zero).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().float().unsqueeze(1).expand_as(ratio)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    pg = -surrogate
    if is_weight is not None:
        if is_weight.shape != logp_new.shape:
            raise ValueError(f"is_weight must be [B, T]={tuple(logp_new.shape)}, got {tuple(is_weight.shape)}")
        pg = pg * is_weight.detach().float()
    per_token = pg
    kl = torch.zeros_like(pg)
    if logp_ref is not None:
        d = torch.where(valid, logp_ref.detach().float() - new, zero).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        kl = torch.exp(d) - d - 1.0
        if kl_coef:
            per_token = per_token + kl_coef * kl
    ent = torch.zeros_like(pg)
    if entropy is not None:
        if entropy.shape != logp_new.shape:
            raise ValueError(f"entropy must be [B, T]={tuple(logp_new.shape)}, got {tuple(entropy.shape)}")
        ent = torch.where(valid, entropy.float(), zero)
        if entropy_coef:
            per_token = per_token - entropy_coef * ent
    loss_sum, count = aggregate(per_token, mask, agg)

    with torch.no_grad():
        v = valid.float()

        def tsum(x: torch.Tensor) -> torch.Tensor:
            return (torch.where(valid, x.detach().float(), zero)).sum()

        metric_sums = {
            "pg_loss": tsum(pg),
            "clipfrac_low": ((adv < 0) & (ratio < 1.0 - eps_low)).float().mul(v).sum(),
            "clipfrac_high": ((adv > 0) & (ratio > 1.0 + eps_high)).float().mul(v).sum(),
            "approx_kl": tsum(ratio - 1.0 - log_ratio),
            "ratio_mean": tsum(ratio),
            "prob_error": tsum(torch.exp(log_ratio.abs())),
            "kl_ref": tsum(kl),
            "entropy": tsum(ent),
        }
    return LossPieces(loss_sum, count, valid.sum().to(torch.int64), metric_sums)


def grpo_loss(
    logp_new: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    agg: Aggregation = "token-mean",
    logp_ref: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO PPO-clip loss of one whole batch (scalar, differentiable) and its token-mean metrics.

    logp_new / logp_old / mask / entropy: [B, T] (mask: non-zero = response token); advantages: [B], one per
    sequence. Use `grpo_loss_pieces` when the batch is split across microbatches or ranks (module docstring).
    """
    p = grpo_loss_pieces(
        logp_new, logp_old, advantages, mask, eps_low, eps_high, agg, logp_ref, kl_coef, entropy, entropy_coef,
        is_weight,
    )
    loss = p.loss_sum / p.count.clamp_min(1).to(p.loss_sum.dtype)
    metrics = metrics_from_vector(p.metric_vector())
    metrics["actor/loss"] = float(loss.detach())
    return loss, metrics
