"""Deterministic random VLM microbatches (token ids with image blocks + pixel tiles) for the parallel step demo,
parity tests and benchmarks; real data comes from `megatron_r1v3.data`."""

from __future__ import annotations

import torch

from megatron_r1v3.config import ModelConfig


def random_text_ids(model: ModelConfig, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Token ids uniform over the vocab without the image tokens (any layout of the special ids works)."""
    specials = sorted({model.image_context_token_id, model.image_start_token_id, model.image_end_token_id})
    ids = torch.randint(0, model.language.vocab_size - len(specials), shape, generator=generator)
    for special in specials:
        ids[ids >= special] += 1
    return ids


def random_microbatches(
    model: ModelConfig, num: int, micro_batch_size: int, seq_length: int, tiles_per_sample: int, seed: int
) -> list[dict]:
    """`num` microbatches; each sample is `<img> <IMG_CONTEXT>*(tiles*tokens_per_tile) </img> text...`."""
    g = torch.Generator().manual_seed(seed)
    n_img = tiles_per_sample * model.tokens_per_tile
    if n_img + 3 > seq_length:
        raise ValueError(f"seq_length={seq_length} too short for {tiles_per_sample} tiles ({n_img} image tokens)")
    size = model.vision.image_size
    out = []
    for _ in range(num):
        ids = random_text_ids(model, (micro_batch_size, seq_length), g)
        ids[:, 0] = model.image_start_token_id
        ids[:, 1 : 1 + n_img] = model.image_context_token_id
        ids[:, 1 + n_img] = model.image_end_token_id
        labels = torch.roll(ids, -1, dims=1)
        loss_mask = torch.ones_like(ids, dtype=torch.float32)
        loss_mask[:, : 2 + n_img] = 0
        loss_mask[:, -1] = 0
        pixels = torch.randn(micro_batch_size * tiles_per_sample, 3, size, size, generator=g)
        out.append({"input_ids": ids, "labels": labels, "loss_mask": loss_mask, "pixel_values": pixels})
    return out
