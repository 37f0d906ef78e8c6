"""From rollouts to Megatron microbatches for the policy loss.

A `Rollout` is one response with everything the loss needs; it is also the selective sample buffer's payload.
Row layout of a microbatch (`[b, s]`, right-padded): `input_ids` = expanded prompt + response, `labels` = the ids
shifted left by one, and at position t (which predicts token t+1):
  `mask`      1 where token t+1 is a response token;
  `old_logp`  the behaviour policy's logprob of token t+1 (the rollout engine's, or recomputed by the trainer);
  `rollout_logp` the engine's logprob (for the train-vs-rollout probability error);
  `critical`  1 where token t+1 starts a critical word (spec §4).
`adv [b]` holds each row's advantage, `fresh [b]` marks this episode's rows (not replayed). Pixels (first pipeline
stage only), group-shared (`share_vision`, the default): the tiles of each prompt in the microbatch once
(`pixel_values`, in first-row order), `image_set_of_row [b]` (which of them row i shows; -1: none) and
`image_set_tiles [sets]`; the model encodes each set once and splices its embeddings into every row of the group
(autograd sums the rows' gradients). Unshared: every row's tiles, in row order. Rows are dealt to DP ranks in
contiguous blocks, so a group's rows share microbatches.
Rows added to fill the last microbatch have an all-zero mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megatron_r1v3.config import ModelConfig


@dataclass
class Rollout:
    """One sampled response and its scores."""

    prompt_index: int
    prompt_ids: list[int]  # expanded by vLLM (one `<IMG_CONTEXT>` per image token)
    response_ids: list[int]
    logprobs: list[float]  # behaviour policy (the engine), one per response token
    reward: float
    accuracy: float
    format: float
    finish_reason: str | None
    step: int  # episode it was generated in
    advantage: float = 0.0
    critical: list[bool] = field(default_factory=list)
    text: str = ""


def shard_rows(rows: Sequence, dp_rank: int, dp_size: int, micro_batch_size: int) -> tuple[list, int]:
    """This DP rank's rows (a contiguous block, so a group's rows stay together) padded with None to whole
    microbatches of the same count on every rank; returns (rows, number of microbatches)."""
    per_rank = -(-len(rows) // dp_size)
    n_micro = max(1, -(-per_rank // micro_batch_size))
    mine = list(rows[dp_rank * per_rank : (dp_rank + 1) * per_rank])
    mine += [None] * (n_micro * micro_batch_size - len(mine))
    return mine, n_micro


def sequence_length(rollouts: Sequence[Rollout], multiple: int = 8) -> int:
    """One padded length for the whole episode (every pipeline stage must agree on the shape)."""
    longest = max(len(r.prompt_ids) + len(r.response_ids) for r in rollouts)
    return -(-longest // multiple) * multiple


def episode_tiles(rows: Sequence[Rollout | None], pixels_of: Callable[[int], torch.Tensor | None],
                  model: ModelConfig) -> dict[int, torch.Tensor | None]:
    """The tiles of every prompt `rows` reference, tiled once (a prompt's G rows share them), each row checked
    against the engine's image token count."""
    tiles: dict[int, torch.Tensor | None] = {}
    for r in rows:
        if r is None:
            continue
        if r.prompt_index not in tiles:
            tiles[r.prompt_index] = pixels_of(r.prompt_index)
        check_image_tokens(r, tiles[r.prompt_index], model.image_context_token_id, model.tokens_per_tile)
    return tiles


def budget_slices(rows: Sequence[Rollout], budget_tokens: int, multiple: int, max_rows: int) -> list[slice]:
    """Consecutive slices of `rows`, each as many rows as fit `budget_tokens` when padded to the slice's longest row
    (rounded up to `multiple`), at most `max_rows`; a row longer than the budget gets a slice of its own."""
    out, start, longest = [], 0, 0
    for i, r in enumerate(rows):
        n = -(-(len(r.prompt_ids) + len(r.response_ids)) // multiple) * multiple
        if i > start and (max(longest, n) * (i - start + 1) > budget_tokens or i - start == max_rows):
            out.append(slice(start, i))
            start, longest = i, 0
        longest = max(longest, n)
    if start < len(rows):
        out.append(slice(start, len(rows)))
    return out


def episode_microbatches(rows: Sequence[Rollout], state, micro_batch_size: int, model: ModelConfig,
                         pixels_of: Callable[[int], torch.Tensor | None], step: int,
                         share_vision: bool = True, micro_batch_tokens: int = 0) -> list[dict]:
    """This DP rank's microbatches of an episode's rows, padded to lengths the layout accepts (multiples of 8 and
    of `ParallelLayout.seq_multiple`): `micro_batch_size` rows padded to the episode's longest, or with
    `micro_batch_tokens` as many consecutive rows as fit that many tokens, each microbatch padded to its own
    longest (the pipeline then runs with variable shapes; the number of microbatches may differ between DP ranks).
    Only the first pipeline stage feeds pixels to the model, so only its ranks tile (their own rows' prompts, once
    each); the other stages' microbatches carry no `pixel_values`."""
    multiple = math.lcm(8, state.layout.seq_multiple)
    if micro_batch_tokens:
        per_rank = -(-len(rows) // state.dp)
        mine = list(rows[state.dp_rank * per_rank : (state.dp_rank + 1) * per_rank])
        tiles = episode_tiles(mine, pixels_of, model) if state.is_first_stage else {}
        if not mine:  # fewer rows than DP ranks: one filler row, so every rank runs the step
            return [microbatch([None], multiple, model.pad_token_id, tiles.get, step, share_vision)]
        return [microbatch(mine[s], sequence_length(mine[s], multiple), model.pad_token_id, tiles.get, step,
                           share_vision) for s in budget_slices(mine, micro_batch_tokens, multiple, micro_batch_size)]
    mine, n_micro = shard_rows(rows, state.dp_rank, state.dp, micro_batch_size)
    seq = sequence_length(rows, multiple)
    tiles = episode_tiles(mine, pixels_of, model) if state.is_first_stage else {}
    return [microbatch(mine[i * micro_batch_size:(i + 1) * micro_batch_size], seq, model.pad_token_id, tiles.get,
                       step, share_vision) for i in range(n_micro)]


def microbatch(
    rows: Sequence[Rollout | None], seq_len: int, pad_id: int, pixels_of: Callable[[int], torch.Tensor | None],
    step: int, share_vision: bool = True,
) -> dict:
    """One microbatch dict from rows (None = filler row); `pixels_of(prompt_index)` gives a prompt's tiles; rows
    generated at `step` are `fresh` (their engine logprobs are the current policy's, for the probability error)."""
    b = len(rows)
    ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(b, seq_len)
    old, rollout_lp, critical = torch.zeros(b, seq_len), torch.zeros(b, seq_len), torch.zeros(b, seq_len)
    adv, fresh = torch.zeros(b), torch.zeros(b)
    tiles, set_of_prompt, set_of_row = [], {}, torch.full((b,), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        if r is None:
            continue
        seq = r.prompt_ids + r.response_ids
        if len(seq) > seq_len:
            raise ValueError(f"rollout of prompt {r.prompt_index} has {len(seq)} tokens > seq_len {seq_len}")
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq) - 1] = torch.tensor(seq[1:])
        p, n = len(r.prompt_ids), len(r.response_ids)
        span = slice(p - 1, p - 1 + n)
        mask[i, span] = 1.0
        old[i, span] = torch.tensor(r.logprobs, dtype=torch.float32)
        rollout_lp[i, span] = torch.tensor(r.logprobs, dtype=torch.float32)
        if r.critical:
            critical[i, span] = torch.tensor(r.critical, dtype=torch.float32)
        adv[i] = r.advantage
        fresh[i] = float(r.step == step)
        px = pixels_of(r.prompt_index)
        if px is None:
            continue
        if not share_vision:
            tiles.append(px)
        elif r.prompt_index not in set_of_prompt:
            set_of_prompt[r.prompt_index] = len(tiles)
            tiles.append(px)
        set_of_row[i] = set_of_prompt.get(r.prompt_index, -1)
    batch = {"input_ids": ids, "labels": labels, "loss_mask": mask, "mask": mask, "old_logp": old,
             "rollout_logp": rollout_lp, "critical": critical, "adv": adv,
             "fresh": fresh}
    if tiles:
        batch["pixel_values"] = torch.cat(tiles)
        if share_vision:
            batch["image_set_of_row"] = set_of_row
            batch["image_set_tiles"] = torch.tensor([t.shape[0] for t in tiles], dtype=torch.long)
    return batch


def vision_counts(microbatches: Sequence[dict], model_chunks) -> torch.Tensor:
    """float64 [3] on this rank: tiles its ViT encoded so far (the model's counter), tiles its microbatches hold (one
    set per group when shared), tiles one per row would be. Zeros off the first pipeline stage."""
    pre = [c for c in model_chunks if getattr(c, "vision_model", None) is not None]
    encoded = float(sum(c.encoded_tiles for c in pre))
    held = per_row = 0.0
    if pre:
        for mb in microbatches:
            if "pixel_values" not in mb:
                continue
            held += mb["pixel_values"].shape[0]
            if "image_set_of_row" in mb:
                rows = mb["image_set_of_row"]
                per_row += float(mb["image_set_tiles"][rows[rows >= 0]].sum())
            else:
                per_row += mb["pixel_values"].shape[0]
    return torch.tensor([encoded, held, per_row], dtype=torch.float64)


def check_image_tokens(rollout: Rollout, pixels: torch.Tensor | None, context_id: int, tokens_per_tile: int) -> None:
    """The engine's expanded prompt must hold exactly one image token per tile token of the trainer's pixels."""
    have = sum(1 for t in rollout.prompt_ids if t == context_id)
    want = 0 if pixels is None else pixels.shape[0] * tokens_per_tile
    if have != want:
        raise ValueError(f"prompt {rollout.prompt_index}: the rollout engine expanded its images to {have} image"
                         f" tokens but the trainer's tiling gives {want} (processor settings differ)")
