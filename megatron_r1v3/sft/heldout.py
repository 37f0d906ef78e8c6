"""Held-out greedy answers from the Megatron model (any layout): well-formed rate and accuracy on the val split.

Uses the reference greedy decoder (no KV cache), so it is for the tiny model and tests; the 38B evaluates with
vLLM (`r1v3 eval`). Images go through the same tiling as training (Pillow decoder: exact, deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_r1v3.config import RunConfig
from megatron_r1v3.data.answers import answers_match, is_well_formed, last_boxed
from megatron_r1v3.data.dali import make_image_decoder
from megatron_r1v3.data.records import RecordReader
from megatron_r1v3.data.sources import DataSources, tiling_for
from megatron_r1v3.data.template import encode_prompt_for_training
from megatron_r1v3.training.generate import greedy_generate


def heldout_answers(chunks, cfg: RunConfig, sources: DataSources, limit: int = 32, max_new_tokens: int = 64,
                    batch_size: int = 16) -> dict:
    """{'well_formed': rate, 'accuracy': rate, 'items': [{question, answer, response, well_formed, correct}]}."""
    tok, m = sources.tokenizer, cfg.model
    decoder = make_image_decoder("pillow", tiling_for(cfg))
    samples = list(RecordReader(sources.val, root=sources.root, strict=False))[:limit]
    items = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        prompts, pixels = [], []
        for s in group:
            tiles = decoder.decode_and_tile(s.load_images(), s.image_sources())
            bad = [t for t in tiles if not torch.is_tensor(t)]
            if bad:
                raise RuntimeError(f"held-out sample {s.source}: {bad[0]}")
            prompts.append(encode_prompt_for_training(tok, s.question, [t.shape[0] for t in tiles], m.tokens_per_tile))
            pixels.append(torch.cat(tiles) if tiles else None)
        outs = greedy_generate(chunks, prompts, pixels, m.language.vocab_size, m.eos_token_id, m.pad_token_id,
                               max_new_tokens)
        for s, ids in zip(group, outs):
            text = tok.decode(ids, skip_special_tokens=True)
            items.append({"question": s.question, "answer": s.answer, "response": text,
                          "well_formed": is_well_formed(text), "correct": answers_match(last_boxed(text), s.answer)})
    n = max(len(items), 1)
    return {"well_formed": sum(i["well_formed"] for i in items) / n, "accuracy": sum(i["correct"] for i in items) / n,
            "items": items}


def write_items(path: Path, items: list[dict]) -> None:
    """Per-item answers as JSONL (one object per held-out sample)."""
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
