"""Multi-process body for tests/rl/test_pixels.py (run through parallel.spawn.run_distributed)."""

from __future__ import annotations


def pp2_pixels_on_the_first_stage_only() -> dict:
    """PP2: GRPO microbatches carry pixels on stage 0 only; the pipeline's logits equal those of microbatches that
    carry them on every stage (the old layout), and change when stage 0's pixels change."""
    import torch
    from megatron.core import parallel_state as ps

    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.batch import Rollout, episode_microbatches, microbatch
    from megatron_r1v3.training.step import forward_logits

    cfg = load_config(None, ["model.preset=tiny", "parallel.pipeline=2"])
    state = init_parallel(cfg)
    m = cfg.model
    chunks = build_model(cfg)
    rows = []
    for g in range(3):  # G = 3 rows for each of prompts 0, 1, 2 (prompt p has p + 1 tiles)
        for p in range(3):
            ids = [m.image_start_token_id] + [m.image_context_token_id] * ((p + 1) * m.tokens_per_tile)
            rows.append(Rollout(p, ids + [m.image_end_token_id, 30 + p], [40 + g, 41, 42], [-0.3] * 3, 1.0, 1.0,
                                1.0, "stop", 0))
    size = m.vision.image_size
    calls: list[int] = []

    def pixels_of(index: int, shift: float = 0.0) -> torch.Tensor:
        calls.append(index)
        return torch.randn(index + 1, 3, size, size, generator=torch.Generator().manual_seed(index)) + shift

    mbs = episode_microbatches(rows, state, 3, m, pixels_of, step=0)
    tiled, calls[:] = sorted(calls), []
    everywhere = [microbatch(rows[i:i + 3], mbs[0]["input_ids"].shape[1], m.pad_token_id, pixels_of, 0)
                  for i in range(0, len(rows), 3)]
    shifted = episode_microbatches(rows, state, 3, m, lambda i: pixels_of(i, 0.5), step=0)
    a, b, c = (forward_logits(chunks, x, m.language.vocab_size) for x in (mbs, everywhere, shifted))
    out = {"stage": state.pp_rank, "tiled": tiled, "pixels": ["pixel_values" in mb for mb in mbs]}
    if a is not None:
        out["same"] = all(torch.equal(x, y) for x, y in zip(a, b))
        out["finite"] = all(bool(torch.isfinite(x[..., :m.language.vocab_size]).all()) for x in a)
        out["pixels_matter"] = any(not torch.equal(x, y) for x, y in zip(a, c))
    ps.destroy_model_parallel()
    return out
