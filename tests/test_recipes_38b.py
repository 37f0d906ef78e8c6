"""Every 38B SFT recipe (`examples/r1v3_38b_*.yaml` without an `rl` section) at its own layout — PP, sequence
parallel, recompute, distributed optimizer, bf16, trainable set, optimizer and schedule — scaled down to the tiny
model at TP2 (tests/recipe_workers.py says what changes): 2 steps, a checkpoint each step, and a resume from the
step-1 checkpoint whose step 2 equals the uninterrupted run's bit for bit. Plus the mirror image of connector-only
tuning at PP2: a trainable set that leaves stage 0 (ViT, connector, embedding) with nothing to train. Cases of one
world size share a launch. The GRPO recipes need vLLM: tests/rollout/test_grpo.py runs them
(tests/rollout/recipe_grpo_38b.py)."""

from __future__ import annotations

import re
import time
from itertools import groupby
from pathlib import Path

import pytest

from megatron_r1v3.parallel.spawn import run_distributed
from tests.recipe_workers import is_grpo, recipes, world_size

pytestmark = pytest.mark.multiprocess
SFT = [r for r in recipes() if not is_grpo(r)]
LAST_STAGE_ONLY = r"^language_model\.output_layer\.,^language_model\.decoder\.final_layernorm\."
BASE = Path(__file__).resolve().parent.parent / "examples" / "r1v3_38b_connector_only.yaml"
# (recipe, extra overrides, label)
CASES = [(r, [], r.stem) for r in SFT] + [(BASE, [f"train.trainable={LAST_STAGE_ONLY}"], "stage0_frozen")]


def test_recipes_are_found():
    assert {"r1v3_38b_coldstart_sft", "r1v3_38b_connector_only", "r1v3_38b_parallel"} <= {r.stem for r in SFT}
    assert "r1v3_38b_grpo" in {r.stem for r in recipes()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    """label -> each rank's result; one launch per world size."""
    out = {}
    for world, group in groupby(sorted(CASES, key=lambda c: world_size(c[0])), key=lambda c: world_size(c[0])):
        group = [(str(r), extra, label) for r, extra, label in group]
        t0 = time.monotonic()
        ranks = run_distributed("tests.recipe_workers:sft_recipes", world, timeout_s=900,
                                workdir=str(tmp_path_factory.mktemp(f"recipes{world}")), cases=group)
        print(f"\n{world} ranks, {len(group)} cases in one launch: {time.monotonic() - t0:.1f}s wall")
        for i, (_, _, label) in enumerate(group):
            out[label] = [rank[i] for rank in ranks]
            r0 = out[label][0]
            cpu = sum(r["cpu_seconds_full"] + r["cpu_seconds_resumed"] for r in out[label])
            print(f"  {label}: uninterrupted {r0['seconds_full']:.1f}s + resumed {r0['seconds_resumed']:.1f}s wall,"
                  f" {cpu:.1f} CPU s over {world} ranks")
    return out


def _names(ranks: list[dict], key: str) -> set[str]:
    return {n.split(".", 1)[1] for r in ranks for n in r[key]}  # without the chunk index


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_recipe_steps_saves_and_resumes_bit_exactly(runs, case):
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.training.freeze import trainable_patterns

    recipe, extra, label = case
    cfg = load_config(recipe, extra)
    ranks = runs[label]
    r0 = ranks[0]
    assert r0["layout"]["pp"] == cfg.parallel.pipeline and r0["layout"]["vpp"] == cfg.parallel.virtual_pipeline
    assert r0["layout"]["distributed_optimizer"] == cfg.optimizer.use_distributed_optimizer
    assert r0["checkpoints"] == ["latest", "step_00000001", "step_00000002"]
    full, resumed = r0["metrics_full"], r0["metrics_resumed"]
    assert sorted(full["sft"]) == [1, 2] and sorted(resumed["sft"]) == [2], (full, resumed)
    assert resumed["sft"][2] == full["sft"][2]  # loss, lr, grad norm, skipped samples: exact
    assert resumed.get("val") == full.get("val")  # the validation loss at step 2, when the recipe evaluates
    for r in ranks:
        assert r["resumed_from"] == 1
        assert r["differences"] == [], (r["rank"], r["differences"][:10])

    # the trainable set: only it moved, and a rank holds optimizer state exactly when it trains something
    patterns = [re.compile(p) for p in trainable_patterns(cfg.train.trainable)]
    trains = [any(p.search(n.split(".", 1)[1]) for p in patterns for n in r["params"]) for r in ranks]
    assert [r["main_params"] > 0 for r in ranks] == trains
    changed = _names(ranks, "changed")
    assert changed and all(any(p.search(n) for p in patterns) for n in changed), sorted(changed)
    if cfg.train.trainable == "connector_only":  # both connector linears moved (a layer-norm weight of 1.0 may
        # not, in bf16: 2 steps of ~1e-5 are under its rounding step of 2^-7 while the fp32 main copy moves)
        connector = {n for n in _names(ranks, "params") if any(p.search(n) for p in patterns)}
        assert len(connector) == 6 and {"mlp1.linear_fc1.weight", "mlp1.linear_fc2.weight"} <= changed, changed
    if label == "stage0_frozen" or cfg.train.trainable == "connector_only":
        assert not all(trains), "the case is meant to leave one pipeline stage with nothing to train"
