#!/usr/bin/env python
"""Re-run the R1V3 report's RL ablations on the toy (spec §3, §4) through the real CLI, several seeds each, and
write `docs/findings.md` (mean ± sd table, verdicts) with one PNG.

    python tools/findings.py [--out runs/findings] [--seeds 3] [--steps 20] [--base runs/demo] [--docs docs]
    python tools/findings.py --smoke --out /tmp/f   # one seed, two steps, two arms, tiny budgets (the test)

The cold start is `make demo`'s (tools/demo.py stages 0-1: captioning pretraining, cold-start SFT), run once
(or taken from `--base`, a demo output directory); every arm is `r1v3 rl` from that SFT checkpoint with the demo's
GRPO settings plus the arm's overrides, one run per seed:
  baseline          every module trainable, shuffled prompts, no dynamic sampling (the demo's stage 2)
  connector_frozen  (a) the connector frozen during RL   (report: RL collapses into repetitive text)
  vit_frozen        (b) the ViT frozen during RL         (report: barely changes reward)
  curriculum        (c) easy->hard prompt order          (report: hurt generalisation)
  dynamic_sampling  (d) DAPO dynamic sampling            (report: stabilised, did not improve)
and (e) on the baseline runs: the checkpoint picked by critical-token entropy (`r1v3 select-checkpoint`, the
report's direction) vs the last checkpoint, both scored by that same evaluation.
Held-out avg@4 at T = 1.0 on the toy val split. Tens of minutes on 2 cores; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import cold_start_sft, grpo, pretrain, run_stage, select  # noqa: E402

ARMS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "connector_frozen": ("train.trainable=freeze_connector",),
    "vit_frozen": ("train.trainable=freeze_vision",),
    "curriculum": ("rl.curriculum=easy_to_hard",),
    "dynamic_sampling": ("rl.dynamic_sampling=true",),
}
REPORT = {
    "connector_frozen": "(a) freezing the connector in RL collapses training into repetitive text",
    "vit_frozen": "(b) freezing the ViT in RL barely changes reward",
    "curriculum": "(c) an easy->hard curriculum hurt generalisation",
    "dynamic_sampling": "(d) DAPO dynamic sampling stabilised training but did not improve it",
    "selection": "(e) choosing the checkpoint by critical-token entropy beats taking the last one",
}
# smoke: tiny budgets everywhere (the stages' own overrides come first, these win)
SMOKE = ("train.steps=2", "data.toy_train=64", "data.toy_val=8", "rl.eval_prompts=8", "rl.prompts_per_step=4",
         "rl.samples_per_prompt=4", "checkpoint.save_every=1")


def repeated(text: str, n: int = 3) -> bool:
    """Whether some word n-gram occurs twice in `text` (the report's "repetitive text")."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def run_summary(run_dir: Path) -> dict[str, float]:
    """Final held-out accuracy, format and repetition of one RL run; reward over the last 5 steps and its sd
    across steps (stability)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["group"] == "rl"}
    evals = {r["step"]: r for r in records if r["group"] == "heldout"}
    last = evals[max(evals)]
    items = [json.loads(x) for x in (run_dir / "evals" / f"step_{max(evals):06d}.jsonl").read_text().splitlines()]
    responses = [t for item in items for t in item["responses"]]
    rewards = [train[s]["reward/mean"] for s in sorted(train)]
    return {"accuracy": last["accuracy"], "sft_accuracy": evals[min(evals)]["accuracy"], "format": last["format"],
            "prompts": last["prompts"],
            "repetition": sum(map(repeated, responses)) / max(len(responses), 1),
            "reward_last": statistics.fmean(rewards[-5:]),
            "reward_sd": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0}


def selection_summary(select_dir: Path) -> dict[str, float]:
    """Accuracy of the entropy-selected checkpoint and of the last one, from one `select-checkpoint` evaluation."""
    sel = json.loads((select_dir / "selection.json").read_text())
    by_name = {r["checkpoint"]: r for r in sel["ranking"]}
    last = max(by_name, key=lambda c: Path(c).name)
    return {"selected": by_name[sel["best"]]["accuracy"] if sel["best"] else float("nan"),
            "last": by_name[last]["accuracy"], "spearman": sel["spearman_vs_accuracy"]}


def mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


COLLAPSED = 0.5  # a run whose held-out well-formed rate ends below this has collapsed


def verdict(arm: str, base: list[dict], other: list[dict]) -> str:
    """Plain words: does the toy reproduce the report's finding for `arm` (differences beyond one pooled sd)?"""
    acc_b, sd_b = mean_sd([r["accuracy"] for r in base])
    acc_o, sd_o = mean_sd([r["accuracy"] for r in other])
    diff, noise = acc_o - acc_b, max(math.hypot(sd_b, sd_o), 0.02)
    if arm == "connector_frozen":
        rep = mean_sd([r["repetition"] for r in other])[0] - mean_sd([r["repetition"] for r in base])[0]
        fmt = mean_sd([r["format"] for r in other])[0] - mean_sd([r["format"] for r in base])[0]
        fell = [sum(r["format"] < COLLAPSED for r in runs) for runs in (other, base)]
        ok = fell[0] > fell[1] or diff < -noise
        return (f"{'reproduced' if ok else 'not reproduced'}: accuracy {diff:+.3f}, well-formed {fmt:+.3f},"
                f" repetitive responses {rep:+.3f} vs baseline; seeds whose format collapsed (< {COLLAPSED}"
                f" well-formed): {fell[0]} of {len(other)} (baseline {fell[1]} of {len(base)})")
    if arm == "vit_frozen":
        rew = mean_sd([r["reward_last"] for r in other])[0] - mean_sd([r["reward_last"] for r in base])[0]
        ok = abs(rew) <= max(noise, 0.03)
        return f"{'reproduced' if ok else 'not reproduced'}: final reward {rew:+.3f}, accuracy {diff:+.3f}"
    if arm == "curriculum":
        return f"{'reproduced' if diff < -noise else 'not reproduced'}: held-out accuracy {diff:+.3f}"
    if arm == "dynamic_sampling":
        sd_diff = mean_sd([r["reward_sd"] for r in other])[0] - mean_sd([r["reward_sd"] for r in base])[0]
        same, steadier = diff <= noise, sd_diff < 0
        word = "reproduced" if same and steadier else "partly reproduced" if same or steadier else "not reproduced"
        return (f"{word}: accuracy {diff:+.3f} ({'no gain' if same else 'a gain'}), sd of the step reward"
                f" {sd_diff:+.4f} ({'steadier' if steadier else 'not steadier'})")
    raise ValueError(arm)


def write_report(results: dict[str, list[dict]], selection: list[dict], docs: Path, command: str, wall_s: float,
                 steps: int, regenerated: str | None = None) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    base = results["baseline"]
    lines = ["# R1V3's RL findings, re-run on the toy", "",
             f"Produced by `{command}` on a 2-core CPU box in {wall_s / 60:.1f} min (tools/findings.py). Cold start:"
             f" `make demo`'s stages 0-1; each arm: `r1v3 rl` for {steps} GRPO steps from that SFT checkpoint, one"
             f" run per seed ({len(base)} seeds). Held-out avg@4 at T = 1.0 on {base[0]['prompts']:.0f} toy val items;"
             " mean ± sd over"
             " seeds." + (f" Table and verdicts re-aggregated from those runs by `{regenerated}`." if regenerated
                          else ""), "",
             "| arm | seeds | held-out avg@4 | format | repetitive | reward (last 5) | sd of step reward |",
             "|---|---|---|---|---|---|---|"]
    for arm, runs in results.items():
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (mean_sd([r[k] for r in runs]) for k in
                                                      ("accuracy", "format", "repetition", "reward_last", "reward_sd"))]
        lines.append(f"| {arm} | {len(runs)} | " + " | ".join(cells) + " |")
    sft = mean_sd([r["sft_accuracy"] for r in base])
    lines += ["", f"SFT starting point: {sft[0]:.3f} avg@4.", "", "## The report's findings, on the toy", ""]
    for arm in results:
        if arm != "baseline":
            lines.append(f"- {REPORT[arm]}: {verdict(arm, base, results[arm])}.")
    if selection:
        sel, last = mean_sd([s["selected"] for s in selection]), mean_sd([s["last"] for s in selection])
        rho = mean_sd([s["spearman"] for s in selection])
        ok = sel[0] - last[0] > 0.02
        lines.append(f"- {REPORT['selection']}: {'reproduced' if ok else 'not reproduced'}: selected"
                     f" {sel[0]:.3f} ± {sel[1]:.3f} vs last {last[0]:.3f} ± {last[1]:.3f}; Spearman(critical entropy,"
                     f" accuracy) {rho[0]:+.3f} ± {rho[1]:.3f} across checkpoints.")
    png = docs / "findings.png"
    lines += ["", f"![held-out accuracy per arm]({png.name})", ""]
    _plot(results, selection, png)
    md = docs / "findings.md"
    md.write_text("\n".join(lines))
    return md


def _plot(results: dict[str, list[dict]], selection: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results) + (["selected", "last"] if selection else [])
    stats = [mean_sd([r["accuracy"] for r in runs]) for runs in results.values()]
    if selection:
        stats += [mean_sd([s["selected"] for s in selection]), mean_sd([s["last"] for s in selection])]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(names)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=4,
           color=["#4c72b0"] * len(results) + ["#55a868", "#c44e52"][: len(names) - len(results)])
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylabel("held-out avg@4")
    ax.set_ylim(0, 1)
    ax.set_title("R1V3's RL ablations on the toy (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/findings")
    p.add_argument("--base", default=None, help="a demo output dir with sft/checkpoints (default: run stages 0-1)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    p.add_argument("--docs", default="docs")
    p.add_argument("--smoke", action="store_true", help="one seed, two steps, tiny budgets, arms baseline+vit_frozen")
    p.add_argument("--report-only", action="store_true",
                   help="re-aggregate the runs under --out (findings.json's command and wall time) without training")
    args = p.parse_args(argv)
    command = "python tools/findings.py " + " ".join(argv if argv is not None else sys.argv[1:])
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or "baseline" not in arms:
        raise SystemExit(f"--arms: unknown {unknown} (known: {', '.join(ARMS)}); baseline is always needed")
    extra = SMOKE if args.smoke else ()
    seeds = [1234 + 1000 * i for i in range(1 if args.smoke else args.seeds)]
    if args.smoke and args.arms == ",".join(ARMS):
        arms = ["baseline", "vit_frozen"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start, times = time.perf_counter(), {}
    base = Path(args.base) if args.base else out
    steps = 2 if args.smoke else args.steps
    if args.report_only:  # the same runs, aggregated again (e.g. after a change to the verdicts)
        done = json.loads((out / "findings.json").read_text())
        results = {arm: [run_summary(base / f"{arm}_seed{seed}") for seed in seeds] for arm in arms}
        selection = [selection_summary(base / f"baseline_seed{seed}_select") for seed in seeds]
        md = write_report(results, selection, Path(args.docs), done["command"], done["wall_s"], steps,
                          regenerated=command)
        print(md.read_text())
        return 0
    if not args.base:  # the demo's cold start, once (kept across re-runs of the tool)
        for stage, cmd in (("pretrain", pretrain(out, seeds[0], extra)), ("sft", cold_start_sft(out, seeds[0], extra))):
            if not (out / stage / "COMPLETE").is_file():
                run_stage(f"cold start: {stage}", cmd, times, out / f"{stage}.log")
    results: dict[str, list[dict]] = {arm: [] for arm in arms}
    selection = []
    for seed in seeds:
        for arm in arms:
            run = f"{arm}_seed{seed}"
            if (base / run).exists():
                shutil.rmtree(base / run)
            cmd = grpo(base, seed, run=run, steps=steps, extra=(*ARMS[arm], *extra))
            run_stage(f"{run}: GRPO", cmd, times, out / f"{run}.log")
            results[arm].append(run_summary(base / run))
        run = f"baseline_seed{seed}"
        run_stage(f"{run}: selection", select(base, seed, run=run, extra=extra), times, out / f"{run}_select.log")
        selection.append(selection_summary(base / f"{run}_select"))
    wall = time.perf_counter() - start
    (out / "findings.json").write_text(json.dumps({"results": results, "selection": selection, "times": times,
                                                   "wall_s": wall, "command": command}, indent=2))
    md = write_report(results, selection, Path(args.docs), command, wall, steps)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
