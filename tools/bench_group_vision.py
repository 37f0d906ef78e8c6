#!/usr/bin/env python
"""Group-shared vision forward (issue 15): one GRPO training step of the tiny model at G = 16, with each group's
image set through the ViT + connector once (`rl.share_vision`, the default) vs one vision forward per row; both in
one run on this machine, interleaved, median of `--repeats`. Prints the step-time ratio, the ViT tiles encoded by
each, and the scaling model's FLOP saving for the 38B at G = 32 (`scaling.compute.group_vision_saving`).

A step = the old-logprob pass + forward/backward + optimizer step (what `rl.grpo.train_on` runs), on one process
(TP1; the TP2·PP2 equality of the two is tests/test_bf16.py's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def rows_for(cfg, prompts: int, group: int, tiles: int, response: int):
    """`prompts` groups of `group` rows; each prompt `tiles` random tiles, responses of `response` random tokens."""
    import torch

    from megatron_r1v3.rl.batch import Rollout

    m, g = cfg.model, torch.Generator().manual_seed(0)
    prompt = [m.image_start_token_id] + [m.image_context_token_id] * (tiles * m.tokens_per_tile) \
        + [m.image_end_token_id] + torch.randint(50, 900, (24,), generator=g).tolist()
    pixels = {i: torch.randn(tiles, 3, m.vision.image_size, m.vision.image_size, generator=g) for i in range(prompts)}
    rows = [Rollout(i // group, prompt, torch.randint(50, 900, (response,), generator=g).tolist(), [-2.0] * response,
                    1.0, 1.0, 1.0, "stop", 1, advantage=float(torch.randn((), generator=g)))
            for i in range(prompts * group)]
    return rows, pixels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.vision.num_layers=8")
    args = ap.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_r1v3.parallel import init_parallel, setup_process

    setup_process()
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.presets import load_config, r1v3_38b
    from megatron_r1v3.rl.batch import episode_microbatches
    from megatron_r1v3.rl.policy_loss import count_units, loss_function, write_logprobs
    from megatron_r1v3.scaling.compute import group_vision_saving
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.step import train_step

    cfg = load_config(None, ["model.preset=tiny", "precision.params_dtype=fp32", f"data.max_tiles={args.tiles}",
                       *args.overrides])
    state = init_parallel(cfg)
    chunks = build_model(cfg)
    ddp = wrap_ddp(chunks, cfg)
    opt = build_optimizer(ddp, cfg)
    rows, pixels = rows_for(cfg, args.prompts, args.group, args.tiles, args.response)

    def step(share: bool) -> tuple[float, int]:
        mbs = episode_microbatches(rows, state, args.group, cfg.model, pixels.__getitem__, 1, share)
        before = chunks[0].encoded_tiles
        t0 = time.perf_counter()
        write_logprobs(ddp, mbs, "old_logp")
        train_step(ddp, opt, mbs, loss_function(cfg.rl, count_units(mbs, cfg.rl.agg), len(mbs)))
        return time.perf_counter() - t0, chunks[0].encoded_tiles - before

    step(True), step(False)  # warm-up
    times: dict[bool, list[float]] = {True: [], False: []}
    tiles: dict[bool, int] = {}
    for _ in range(args.repeats):
        for share in (True, False):
            seconds, tiles[share] = step(share)
            times[share].append(seconds)
    shared, unshared = statistics.median(times[True]), statistics.median(times[False])
    print(f"tiny VLM {' '.join(args.overrides)}, {args.prompts} prompts x G={args.group} rows, {args.tiles} tiles"
          f"/prompt, {len(rows[0].prompt_ids) + args.response} tokens/row, fp32, 1 process:")
    print(f"  step shared {shared:.3f} s  unshared {unshared:.3f} s  shared/unshared = {shared / unshared:.3f}")
    print(f"  ViT tiles per step: shared {tiles[True]}  unshared {tiles[False]}")
    for seq in (4096, 8192, 16384):
        s = group_vision_saving(r1v3_38b(), seq, 13, 32)
        print(f"  38B scaling model, G=32, 13 tiles, {seq} tokens/row: vision = {s['vision_share_of_row']:.1%} of a"
              f" row's training FLOPs; sharing saves {s['saving']:.1%} of the group's FLOPs")


if __name__ == "__main__":
    main()
