"""One training step and one evaluation forward through megatron-core's pipeline schedules.

A microbatch is a dict: `input_ids [b, s]`, `labels [b, s]`, `loss_mask [b, s]` (1 where the token is trained on)
and optionally `pixel_values [tiles, 3, S, S]` (only the first stage uses them; later stages may omit them). Every
stage iterates the same microbatches, moved to the compute device by `to_device`; stage 0 uses the ids and pixels,
the last stage the labels. The loss is the token mean of each microbatch, averaged over microbatches and DP.
A microbatch collated with packing (`packed: True`, `cu_seqlens`, `max_seqlen`, `position_ids`) runs as one THD row
of b*s tokens with megatron's `PackedSeqParams` (`models/packing.py`), so packed samples neither attend to each
other nor share RoPE positions; the pipeline's p2p shape is then `[b*s, 1, h]`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_r1v3.models.packing import packed_seq_params_from_batch
from megatron_r1v3.models.vlm import gather_logits
from megatron_r1v3.parallel.init import compute_device
from megatron_r1v3.parallel.phase import set_phase


def token_loss(batch: dict, logits: torch.Tensor):
    """Masked token-mean cross entropy on vocab-parallel logits; returns (loss, metrics for logging)."""
    per_token = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), batch["labels"])
    mask = batch["loss_mask"].float()
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"loss": loss.detach().clone()}


def to_device(batch: dict, device: torch.device) -> dict:
    """The one place a microbatch moves to the compute device (every pass goes through `run_schedule`): tensors
    copied non-blocking, image tiles through pinned host memory on GPU so the copy overlaps compute. Other values
    (counts, lists) as they are. A no-op for tensors already there (e.g. logprobs written by an earlier pass)."""
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.device != device:
            if key == "pixel_values" and device.type == "cuda" and not value.is_pinned():
                value = value.pin_memory()
            value = value.to(device, non_blocking=True)
        out[key] = value
    return out


def _forward_step(data_iterator, model, loss_fn=token_loss):
    raw = next(data_iterator)
    device = compute_device()
    packed = packed_seq_params_from_batch(raw, device)  # checked on the host, before the copy
    batch = to_device(raw, device)
    # rl/batch.py's group-shared image sets: index bookkeeping the model reads on the host (no device round trip)
    shared = {k: raw[k] for k in ("image_set_of_row", "image_set_tiles") if k in raw}
    if packed is None:
        out = model(batch["input_ids"], pixel_values=batch.get("pixel_values"), **shared)
    else:
        out = model(batch["input_ids"], position_ids=batch["position_ids"], pixel_values=batch.get("pixel_values"),
                    packed_seq_params=packed, **shared)
    return out, partial(loss_fn, batch)


def _iterators(microbatches: list[dict], n_chunks: int):
    return [iter(microbatches) for _ in range(n_chunks)] if n_chunks > 1 else iter(microbatches)


def _shape(microbatches: list[dict], variable: bool = False) -> tuple[int, int]:
    """(micro_batch_size, seq_length) of the activations the pipeline stages exchange: `[b, s]` as is, a packed
    `[b, s]` as one THD row `[1, b*s]`. Every microbatch must agree (fixed p2p shapes) unless the model's config
    has `variable_seq_lengths` (the stages then send each activation's shape first)."""
    b, s = microbatches[0]["input_ids"].shape
    packed = bool(microbatches[0].get("packed"))
    for i, mb in enumerate(microbatches):
        if tuple(mb["input_ids"].shape) != (b, s) and not variable:
            raise ValueError(f"microbatch {i} has shape {tuple(mb['input_ids'].shape)}, expected {(b, s)} (pad first)")
        if bool(mb.get("packed")) != packed:
            raise ValueError(f"microbatch {i} has packed={bool(mb.get('packed'))}, microbatch 0 packed={packed}: "
                             "one step's microbatches are all packed or none")
    return (1, b * s) if packed else (b, s)


def broadcast_from_last_stage(value: float) -> float:
    """Make a last-stage scalar (e.g. the loss) known on every rank."""
    t = torch.tensor([value], dtype=torch.float64, device=compute_device())
    if ps.get_pipeline_model_parallel_world_size() > 1:
        src = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(t, src=src, group=ps.get_pipeline_model_parallel_group())
    return float(t.item())


def run_schedule(chunks, microbatches: list[dict], loss_fn, forward_only: bool) -> list[dict]:
    """megatron's pipeline schedule over all microbatches; returns the loss functions' dicts (last stage only).
    Forward-only runs switch the chunks to eval mode for the duration."""
    b, s = _shape(microbatches, bool(getattr(chunks[0].config, "variable_seq_lengths", False)))
    if forward_only:
        for c in chunks:
            c.eval()
    try:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn=loss_fn),
            data_iterator=_iterators(microbatches, len(chunks)),
            model=chunks,
            num_microbatches=len(microbatches),
            seq_length=s,
            micro_batch_size=b,
            forward_only=forward_only,
        )
    finally:
        if forward_only:
            for c in chunks:
                c.train()


def train_step(ddp_chunks, optimizer, microbatches: list[dict], loss_fn=token_loss) -> dict:
    """Forward/backward over all microbatches (pipelined), DP grad reduce, optimizer step. Returns metrics."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    set_phase("train_step: forward/backward")
    outputs = run_schedule(ddp_chunks, microbatches, loss_fn, forward_only=False)
    set_phase("train_step: optimizer")
    ok, grad_norm, _ = optimizer.step()
    loss = 0.0
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss_t = torch.stack([o["loss"] for o in outputs]).mean()
        dist.all_reduce(loss_t, group=ps.get_data_parallel_group())
        loss = float(loss_t) / ps.get_data_parallel_world_size()
    set_phase("train_step: done")
    return {"loss": broadcast_from_last_stage(loss), "grad_norm": float(grad_norm or 0.0), "update_ok": bool(ok),
            "outputs": outputs}


def _logits_loss(vocab_size: int, batch: dict, logits: torch.Tensor):
    return torch.zeros(()), {"logits": gather_logits(logits, vocab_size).detach()}


@torch.no_grad()
def forward_logits(chunks, microbatches: list[dict], vocab_size: int) -> list[torch.Tensor] | None:
    """Full-vocab logits `[b, s, V]` per microbatch on the last pipeline stage (None on other stages)."""
    outputs = run_schedule(chunks, microbatches, partial(_logits_loss, vocab_size), forward_only=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [o["logits"] for o in outputs]


@torch.no_grad()
def eval_loss(chunks, microbatches: list[dict], loss_fn=token_loss) -> float:
    """Mean masked token loss over microbatches (forward only), known on every rank."""
    outputs = run_schedule(chunks, microbatches, loss_fn, forward_only=True)
    loss = 0.0
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss = float(torch.stack([o["loss"] for o in outputs]).mean())
    return broadcast_from_last_stage(loss)
