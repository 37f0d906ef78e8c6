"""`tools/findings.py`: every arm's recipe validates and differs from the baseline only by its overrides; the
verdicts read the numbers. The tool's end-to-end smoke run (one seed, two steps) shares tests/rollout/test_grpo.py's
SFT start-up (`test_findings_tool_runs_on_one_seed_and_two_steps`). Needs vLLM (the vLLM venv)."""

from __future__ import annotations

import pytest

from megatron_r1v3.config import validate
from megatron_r1v3.presets import load_config
from tests.rollout.test_vllm_refit import _NO_VLLM
from tools.findings import ARMS, grpo, repeated, verdict

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")]


def test_every_arm_is_a_valid_recipe_that_differs_from_the_baseline_only_by_its_overrides(tmp_path):
    base = grpo(tmp_path, 1234, run="baseline")
    for arm, extra in ARMS.items():
        cmd = grpo(tmp_path, 1234, run=arm, extra=extra)
        recipe, overrides = cmd[4], [a for a in cmd[5:] if "=" in a]
        cfg = validate(load_config(recipe, overrides))
        assert cfg.rl.rollout_tp == 1 and cfg.checkpoint.save_every == 5  # the demo's GRPO stage
        expected = [] if arm == "baseline" else [f"output_dir={tmp_path}/{arm}", *extra]
        assert [a for a in cmd if a not in base] == expected, arm


def test_verdicts_and_repetition_read_the_numbers_they_are_given():
    assert repeated("a b c a b c") and not repeated("the image shows a red circle")
    base = [{"accuracy": 0.60, "format": 0.9, "repetition": 0.0, "reward_last": 0.6, "reward_sd": 0.05}] * 3
    worse = [{"accuracy": 0.30, "format": 0.3, "repetition": 0.4, "reward_last": 0.3, "reward_sd": 0.02}] * 3
    assert verdict("connector_frozen", base, worse).startswith("reproduced")
    assert verdict("connector_frozen", base, base).startswith("not reproduced")
    assert verdict("vit_frozen", base, base).startswith("reproduced")
    assert verdict("vit_frozen", base, worse).startswith("not reproduced")
    assert verdict("curriculum", base, worse).startswith("reproduced")
    assert verdict("dynamic_sampling", base, worse).startswith("reproduced")
    assert verdict("dynamic_sampling", base, base).startswith("partly reproduced")  # no gain, not steadier
    assert "collapsed (< 0.5 well-formed): 3 of 3 (baseline 0 of 3)" in verdict("connector_frozen", base, worse)
