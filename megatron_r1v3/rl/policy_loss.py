"""The GRPO loss as a megatron-core pipeline loss function, and the forward-only logprob pass.

Per microbatch (see `rl/batch.py` for the fields) on the last pipeline stage: token logprobs from the vocab-parallel
logits (megatron's `vocab_parallel_cross_entropy`, no vocab gather), token entropy (`metrics.entropy`), then
`rl.loss.grpo_loss_pieces`. The step's loss is Σ loss_sum / Σ count over all microbatches of all DP ranks
(`total_count`, known before the backward pass); megatron divides a two-value loss by the number of microbatches and
the DDP gradient reduction averages over DP, so each microbatch returns `loss_sum · n_micro · dp / total_count`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_r1v3.config import RLConfig
from megatron_r1v3.metrics.entropy import vocab_parallel_entropy
from megatron_r1v3.parallel.init import compute_device
from megatron_r1v3.rl.loss import (
    METRIC_KEYS,
    aggregation_count,
    grpo_loss_pieces,
    metrics_from_vector,
    rollout_correction_weights,
)
from megatron_r1v3.training.step import run_schedule

# summed alongside grpo_loss_pieces' metric vector (after its num_tokens + METRIC_KEYS entries)
EXTRA_KEYS: tuple[str, ...] = (
    "rollout_tokens",  # fresh (this episode's) response tokens
    "rollout_prob_error",  # Σ exp(|logp_train − logp_rollout|) over fresh tokens
    "crit_resp_sum", "crit_resp_n",  # Σ over responses with a critical token of their mean H there; their count
    "crit_next_sum", "crit_next_n",  # the same one position later (spec §4 "variant at t+1")
    "crit_tokens",
    "is_tokens", "is_weight_sum", "is_corrected",  # rollout correction: valid tokens, Σ w = π_old/π_rollout, capped
)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per position from vocab-parallel logits `[b, s, V/tp]` (differentiable)."""
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


def _per_response_mean(values: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = flags.sum(dim=1)
    s = (torch.where(flags > 0, values, torch.zeros_like(values))).sum(dim=1)
    has = n > 0
    return (s[has] / n[has]).sum(), has.sum().float()


def policy_loss(rl: RLConfig, scale: float, batch: dict, logits: torch.Tensor):
    """megatron loss function: (scaled loss, {'loss': the same, detached, 'vec': metric sums})."""
    mask = batch["mask"]
    if rl.entropy_coef:
        entropy = vocab_parallel_entropy(logits)
    else:
        with torch.no_grad():
            entropy = vocab_parallel_entropy(logits.detach())
    logp = token_logprobs(logits, batch["labels"])
    # π_old (the trainer's) over π_rollout (the engine that sampled, possibly an older policy for replays)
    weight, w, corrected = rollout_correction_weights(batch["old_logp"], batch["rollout_logp"], mask,
                                                      rl.rollout_correction, rl.rollout_correction_cap)
    pieces = grpo_loss_pieces(logp, batch["old_logp"], batch["adv"], mask, rl.eps_low, rl.eps_high, rl.agg,
                              batch.get("ref_logp"), rl.kl_coef, entropy, rl.entropy_coef,
                              weight if rl.rollout_correction != "none" else None)
    with torch.no_grad():
        fresh = mask * batch["fresh"].unsqueeze(1)
        err = torch.exp((logp.detach() - batch["rollout_logp"]).abs().clamp(max=20.0))
        crit = batch["critical"] * mask
        nxt = torch.zeros_like(crit)
        nxt[:, 1:] = crit[:, :-1]
        nxt = nxt * mask
        ent = entropy.detach().float()
        crit_sum, crit_n = _per_response_mean(ent, crit)
        next_sum, next_n = _per_response_mean(ent, nxt)
        valid = (mask != 0).double()
        extra = torch.stack([fresh.sum().double(), (err * fresh).sum().double(), crit_sum.double(),
                             crit_n.double(), next_sum.double(), next_n.double(), crit.sum().double(),
                             valid.sum(), (w.double() * valid).sum(), corrected.double().sum()])
    # "loss": train_step averages it over microbatches and DP, which gives exactly Σ loss_sum / total_count
    loss = pieces.loss_sum * scale
    return loss, {"loss": loss.detach().clone(), "vec": torch.cat([pieces.metric_vector(), extra])}


def count_units(microbatches: list[dict], agg: str) -> float:
    """Σ aggregation units over this rank's microbatches, all-reduced over DP: the step's loss denominator."""
    local = sum(int(aggregation_count(mb["mask"], agg)) for mb in microbatches)
    t = torch.tensor([float(local)], dtype=torch.float64, device=compute_device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return max(float(t), 1.0)


def reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Sum the microbatches' metric vectors over DP on the last stage, share them with every rank, name them."""
    size = 1 + len(METRIC_KEYS) + len(EXTRA_KEYS)
    vec = torch.zeros(size, dtype=torch.float64, device=compute_device())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for o in outputs:
            vec += o["vec"].double()
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(vec, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    out = metrics_from_vector(vec[: 1 + len(METRIC_KEYS)])
    vec = vec.cpu()
    extra = dict(zip(EXTRA_KEYS, vec[1 + len(METRIC_KEYS):].tolist()))
    out["rollout/prob_error"] = extra["rollout_prob_error"] / max(extra["rollout_tokens"], 1.0)
    out["rollout/critical_entropy"] = extra["crit_resp_sum"] / extra["crit_resp_n"] if extra["crit_resp_n"] else 0.0
    out["rollout/critical_entropy_next"] = (extra["crit_next_sum"] / extra["crit_next_n"]
                                            if extra["crit_next_n"] else 0.0)
    out["rollout/critical_tokens"] = extra["crit_tokens"]
    # π_old_train / π_rollout over every trained token (replays included): 1 when the engine is the trainer
    out["rollout/is_weight_mean"] = extra["is_weight_sum"] / max(extra["is_tokens"], 1.0)
    out["rollout/is_corrected_fraction"] = extra["is_corrected"] / max(extra["is_tokens"], 1.0)
    return out


def _logprob_loss(batch: dict, logits: torch.Tensor):
    return torch.zeros(()), {"logp": token_logprobs(logits.detach(), batch["labels"]).detach()}


@torch.no_grad()
def write_logprobs(chunks, microbatches: list[dict], key: str) -> None:
    """Forward-only pass; on the last stage store each microbatch's token logprobs under `key` (where the loss
    reads them; other stages never read them). Used for recomputed old logprobs and reference logprobs."""
    outputs = run_schedule(chunks, microbatches, _logprob_loss, forward_only=True)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        for mb, o in zip(microbatches, outputs):
            mb[key] = o["logp"]


def loss_function(rl: RLConfig, total_count: float, n_micro: int):
    """The loss function for `training.step.train_step` (scale: see the module docstring)."""
    scale = n_micro * ps.get_data_parallel_world_size() / total_count
    return partial(policy_loss, rl, scale)
