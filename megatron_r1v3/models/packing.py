"""Packed rows: several samples in one row, kept apart in attention and in RoPE.

A packed microbatch (`input_ids [b, s]`, `cu_seqlens` the segment starts over the b*s tokens flattened row-major,
ending with b*s) runs as ONE row of b*s tokens in megatron-core's THD format, described by
`PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv, max_seqlen_q/kv)`:
- RoPE restarts at every segment start: megatron's attention applies the rotary table per cu_seqlens segment
  (`rope_utils._apply_rotary_pos_emb_thd`), so positions equal the batch's `position_ids` (checked here). With a
  plain mask instead, GPTModel would compute RoPE from the sequence length and positions would run on across
  samples.
- Attention stays inside each segment: Transformer Engine's fused attention reads the cu_seqlens itself; the local
  spec's `PackedDotProductAttention` turns them into a block-diagonal causal mask (megatron-core's own
  DotProductAttention refuses THD).
Padding tails are their own segments and carry no loss; labels never cross a segment end (checked here).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class PackedBatchError(ValueError):
    """A packed microbatch whose `cu_seqlens`, `position_ids` or `loss_mask` do not describe separate samples."""


def _segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of each of the `total` flattened tokens."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths, output_size=total)


def check_packed_batch(batch: dict) -> None:
    """Raise PackedBatchError (naming the field and token) unless the batch's cu_seqlens cover its b*s tokens in
    increasing order, max_seqlen is their longest segment, position_ids restart at 0 per segment and no trained
    label crosses a segment end."""
    b, s = batch["input_ids"].shape
    total = b * s
    cu = batch.get("cu_seqlens")
    if cu is None or cu.dim() != 1 or cu.numel() < 2 or cu.dtype not in (torch.int32, torch.int64):
        raise PackedBatchError(f"packed batch needs cu_seqlens as a 1-D integer tensor, got {cu!r:.80}")
    cu = cu.cpu().long()
    lengths = cu[1:] - cu[:-1]
    if int(cu[0]) != 0 or int(cu[-1]) != total or bool((lengths <= 0).any()):
        raise PackedBatchError(f"cu_seqlens must rise strictly from 0 to b*s={total}, got {cu.tolist()}")
    longest = int(lengths.max())
    given = batch.get("max_seqlen")
    if given is None or int(given) != longest:
        raise PackedBatchError(f"max_seqlen={given!r} but the longest cu_seqlens segment is {longest}")
    seg = _segment_ids(cu, total)
    if "position_ids" in batch:
        expected = torch.arange(total) - cu[seg]
        bad = (batch["position_ids"].cpu().reshape(-1) != expected).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise PackedBatchError(f"position_ids[{i // s}, {i % s}] = {int(batch['position_ids'].reshape(-1)[i])}, "
                                   f"expected {int(expected[i])}: positions must restart at each cu_seqlens start")
    if "loss_mask" in batch:
        ends = cu[1:] - 1
        crossing = (batch["loss_mask"].cpu().reshape(-1)[ends] != 0).nonzero()
        if crossing.numel():
            i = int(ends[int(crossing[0])])
            raise PackedBatchError(f"loss_mask[{i // s}, {i % s}] is set on the last token of a segment: its label "
                                   "would be the next sample's first token")


def packed_seq_params_from_batch(batch: dict, device: torch.device | None = None) -> Optional[PackedSeqParams]:
    """THD params for a batch collated with packing (`batch["packed"]`), None otherwise. The batch is checked
    (`check_packed_batch`) on the host; cu_seqlens go to `device` as int32 (TE's and megatron's THD kernels need
    int32 on the compute device), max_seqlen stays a Python int."""
    if not batch.get("packed"):
        return None
    if ps.model_parallel_is_initialized() and ps.get_context_parallel_world_size() > 1:
        raise PackedBatchError("packed rows (data.pack=true) with context parallelism are not supported: THD needs "
                               "cu_seqlens padded and split per CP rank")
    check_packed_batch(batch)
    cu = batch["cu_seqlens"].to(device=device or batch["cu_seqlens"].device, dtype=torch.int32, non_blocking=True)
    longest = int(batch["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def block_diagonal_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """`[1, 1, total, total]` bool, True = masked (megatron's convention): a token sees the earlier tokens of its own
    segment only."""
    seg = _segment_ids(cu_seqlens, total)
    later = torch.ones(total, total, dtype=torch.bool, device=cu_seqlens.device).triu(1)
    return ((seg[:, None] != seg[None, :]) | later)[None, None]


class PackedDotProductAttention(DotProductAttention):
    """megatron-core's local (unfused) attention, also for THD packed rows: `[t, heads, dim]` queries/keys/values
    with `packed_seq_params` run as one `[t, 1, ...]` row under a block-diagonal causal mask (the CPU path)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias=None, packed_seq_params: Optional[PackedSeqParams] = None):
        """Plain attention, or the packed-row conversion when `packed_seq_params` is THD."""
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd" or attention_mask is not None:
            raise ValueError(f"local attention takes packed rows as THD without an attention_mask, got "
                             f"qkv_format={packed_seq_params.qkv_format!r}, mask given: {attention_mask is not None}")
        total = query.shape[0]
        mask = block_diagonal_causal_mask(packed_seq_params.cu_seqlens_q, total)
        out = super().forward(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), mask, attn_mask_type,
                              attention_bias)
        return out  # [t, 1, hidden/tp]; megatron's attention reshapes it back for THD
