"""Token entropy on vocab-parallel logits, and the critical-token entropy of R1V3's checkpoint selection (spec §4).

`H_t = −Σ_v p_v log p_v` (nats) of the next-token distribution at every position, computed on the tensor-parallel
vocab shards without gathering the vocabulary: a max, a normaliser and `E_p[logit]` are all-reduced over the TP
group (`H = log Z + m − E_p[x]`). Padded vocabulary entries carry −inf logits: they get probability 0 and are kept
out of every product (0 · −inf would be NaN). Differentiable (for an entropy bonus) through megatron's
reduce-from-TP region (identity backward, as for every TP-replicated loss).

Critical positions (spec §4 step 3): inside `<think>…</think>`, the response tokens that start one of the critical
words (case-insensitive, whole words; default wait / alternatively / hmm). `H` at such a token's position is the
entropy of the distribution it was sampled from; the "next" variant is the entropy of the token after it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.distributed as dist

DEFAULT_CRITICAL_WORDS: tuple[str, ...] = ("wait", "alternatively", "hmm")


def _tp_group():
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def vocab_parallel_entropy(logits: torch.Tensor, group=None) -> torch.Tensor:
    """Entropy `[...]` of softmax(logits) where `logits [..., V/tp]` is this rank's vocab shard (TP group from
    megatron's parallel state unless `group` is given; a full-vocab tensor outside TP works too)."""
    group = group if group is not None else _tp_group()
    x = logits.float()
    with torch.no_grad():
        m = x.max(dim=-1).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = x - m.unsqueeze(-1)
    e = torch.exp(shifted)
    safe = torch.where(torch.isfinite(shifted), shifted, torch.zeros_like(shifted))  # no 0 * -inf, not even in grads
    z = e.sum(dim=-1)
    ex = (e * safe).sum(dim=-1)
    if group is not None:
        # megatron's reduce: all-reduce forward, identity backward (the loss is replicated over TP ranks)
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region as reduce

        z = reduce(z, group=group)
        ex = reduce(ex, group=group)
    return torch.log(z) - ex / z


def token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token's own text (decoded alone; a character split across byte-level tokens shows as U+FFFD)."""
    return [tokenizer.decode([int(t)]) for t in token_ids]


def critical_mask(
    tokenizer, token_ids: Sequence[int], words: Sequence[str] = DEFAULT_CRITICAL_WORDS,
    think_open: str = "<think>", think_close: str = "</think>", think_prefilled: bool = True,
) -> list[bool]:
    """Per response token: does a critical word start in it, inside the think block?

    `think_prefilled`: the prompt already ends with `<think>` (the R1V3 template), so the response starts inside.
    """
    if not words:
        return [False] * len(token_ids)
    texts = token_texts(tokenizer, token_ids)
    full = "".join(texts)
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    think_start = 0 if think_prefilled else full.find(think_open)
    think_end = full.find(think_close, max(think_start, 0))
    if think_start < 0:
        return [False] * len(texts)
    think_end = len(full) if think_end < 0 else think_end
    pattern = re.compile(r"(?<![A-Za-z])(" + "|".join(re.escape(w) for w in words) + r")(?![A-Za-z])", re.IGNORECASE)
    hits = {m.start() for m in pattern.finditer(full) if think_start <= m.start() < think_end}
    mask = [False] * len(texts)
    for i, (s, t) in enumerate(zip(starts, texts)):
        mask[i] = any(s <= h < s + len(t) for h in hits) if hits else False
    return mask
