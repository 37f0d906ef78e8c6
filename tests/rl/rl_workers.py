"""Multi-process bodies for tests/rl (run through parallel.spawn.run_distributed)."""

from __future__ import annotations


def vocab_parallel_pieces() -> dict:
    """TP2: entropy and token logprobs from vocab shards (with -inf padded rows) vs the full-vocab reference,
    values and gradients."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_r1v3.metrics.entropy import vocab_parallel_entropy
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.policy_loss import token_logprobs

    init_parallel(load_config(None, ["model.preset=tiny", "parallel.tensor=2"]))
    torch.manual_seed(0)
    full = torch.randn(2, 5, 16, dtype=torch.float64) * 3
    full[..., 13:] = float("-inf")  # padded vocab rows live on the last shard
    labels = torch.randint(0, 13, (2, 5))
    rank = ps.get_tensor_model_parallel_rank()
    shard = full[..., rank * 8:(rank + 1) * 8].clone().float().requires_grad_(True)
    h = vocab_parallel_entropy(shard)
    lp = token_logprobs(shard, labels)
    (h.sum() + 0.5 * lp.sum()).backward()

    ref = full[..., :13].clone().requires_grad_(True)
    logp = torch.log_softmax(ref, dim=-1)
    h_ref = -(logp.exp() * logp).sum(-1)
    lp_ref = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (h_ref.sum() + 0.5 * lp_ref.sum()).backward()
    grad_ref = torch.cat([ref.grad, torch.zeros(2, 5, 3, dtype=torch.float64)], dim=-1)[..., rank * 8:(rank + 1) * 8]
    return {
        "entropy": float((h.double() - h_ref.detach()).abs().max()),
        "logprob": float((lp.double() - lp_ref.detach()).abs().max()),
        "grad": float((shard.grad.double() - grad_ref).abs().max()),
        "finite": bool(torch.isfinite(h).all() and torch.isfinite(shard.grad).all()),
    }
