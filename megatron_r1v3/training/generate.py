"""Greedy decoding on the Megatron model itself (any TP/PP): a reference for tests and tiny evaluations.

No KV cache, one full forward per new token, so it is only for small models; rollouts and eval use vLLM.
"""

from __future__ import annotations

import torch

from megatron_r1v3.parallel.init import compute_device
from megatron_r1v3.training.step import forward_logits


@torch.no_grad()
def greedy_generate(
    chunks, prompts: list[list[int]], pixel_values: list[torch.Tensor | None], vocab_size: int, eos_id: int,
    pad_id: int, max_new_tokens: int,
) -> list[list[int]]:
    """Continue each prompt greedily until `eos_id` or `max_new_tokens`; returns the new tokens per prompt."""
    seqs = [list(p) for p in prompts]
    done = [False] * len(seqs)
    pixels = [p for p in pixel_values if p is not None]
    pix = torch.cat(pixels) if pixels else None
    for _ in range(max_new_tokens):
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        batch = {"input_ids": ids, "labels": ids, "loss_mask": torch.zeros_like(ids, dtype=torch.float32)}
        if pix is not None:
            batch["pixel_values"] = pix
        logits = forward_logits(chunks, [batch], vocab_size)
        nxt = torch.zeros(len(seqs), dtype=torch.long, device=compute_device())
        if logits is not None:
            last = torch.tensor([len(s) - 1 for s in seqs], device=nxt.device)
            nxt = logits[0][torch.arange(len(seqs), device=nxt.device), last].argmax(-1)
        nxt = _share_from_last_stage(nxt)
        for i, token in enumerate(nxt.tolist()):
            if not done[i]:
                seqs[i].append(token)
                done[i] = token == eos_id
        if all(done):
            break
    return [s[len(p):] for s, p in zip(seqs, prompts)]


def _share_from_last_stage(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return t
