#!/usr/bin/env python
"""Rank R1V3 training layouts on N H100 nodes by predicted throughput; write a CSV and a PNG plot.

Every (TP, CP, PP, VPP or lighter first stage, micro-batch, recompute, distributed optimizer, FP8) combination is
checked against `ParallelLayout.problems` (the rules a run checks at start, TE available), then its worst stage's
memory (megatron_r1v3.scaling.memory) against the GPU and its step time (megatron_r1v3.scaling.compute) predicted.
Feasibility is judged for plain training and for GRPO with a colocated vLLM (`--vllm-tp`, `--gpu-mem-util`);
`--rollout` picks which one the printed ranking uses. With `--tp` (and friends) it reports one layout instead.

  python tools/scaling_study.py --nodes 1 2 4 8
  python tools/scaling_study.py --nodes 2 --tp 8 --pp 2 --recompute --fp8
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from megatron_r1v3.presets import get_preset  # noqa: E402
from megatron_r1v3.scaling.compute import H100, Hardware  # noqa: E402
from megatron_r1v3.scaling.layouts import Candidate, Rollout, enumerate_layouts, evaluate  # noqa: E402
from megatron_r1v3.scaling.memory import GIB, Layout  # noqa: E402


def row(nodes: int, train: Candidate, coloc: Candidate) -> dict:
    """One CSV row: the layout, its worst stage's memory (GiB), time and both feasibility verdicts."""
    lay, mem, t = train.layout, train.memory, train.time
    return {
        "nodes": nodes, "gpus": lay.world, "layout": lay.label(), "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp or 1,
        "cp": lay.cp, "dp": lay.dp, "micro_batch": lay.micro_batch, "num_microbatches": lay.num_microbatches,
        "sequence_parallel": lay.sequence_parallel, "recompute": lay.recompute,
        "distributed_optimizer": lay.distributed_optimizer, "fp8": lay.fp8,
        "first_stage_layers": lay.first_stage_layers or "", "worst_stage": mem.pp_rank,
        "stage_params_b": round(mem.params / 1e9, 3),
        **{f"{k}_gib": round(getattr(mem, k) / GIB, 2) for k in (
            "weights", "grads", "optimizer", "fp8_cache", "activations", "transient", "overhead", "total")},
        "step_s": round(t["step_s"], 3), "samples_per_s": round(t["samples_per_s"], 4),
        "tokens_per_s": round(t["tokens_per_s"]), "mfu": round(t["mfu"], 4), "bubble_s": round(t["bubble_s"], 3),
        "tp_comm_s": round(t["tp_comm_s"], 3), "dp_sync_s": round(t["dp_sync_s"], 3),
        "rules_ok": train.rules_ok, "feasible_training": train.feasible, "feasible_colocated": coloc.feasible,
        "rollout_peak_gib": round(coloc.vllm["rollout_peak"] / GIB, 2), "vllm_kv_tokens": int(coloc.vllm["kv_tokens"]),
        "problems": "; ".join(train.problems) or "; ".join(coloc.problems),
    }


def study(model, nodes: list[int], hw: Hardware, rollout: Rollout, args) -> list[dict]:
    """Every enumerated layout for every node count, evaluated for training alone and colocated with vLLM."""
    rows = []
    for n in nodes:
        for lay in enumerate_layouts(model, n, hw.gpus_per_node, args.global_batch, args.seq_length, args.tiles):
            train = evaluate(model, lay, hw, None, args.global_batch)
            coloc = evaluate(model, lay, hw, rollout, args.global_batch)
            rows.append(row(n, train, coloc))
    return rows


def ranked(rows: list[dict], nodes: int, key: str) -> list[dict]:
    """Feasible rows of one node count, fastest first (ties: less memory)."""
    ok = [r for r in rows if r["nodes"] == nodes and r[key]]
    return sorted(ok, key=lambda r: (-r["samples_per_s"], r["total_gib"]))


def plot(rows: list[dict], nodes: list[int], key: str, capacity_gib: float, path: Path) -> None:
    """Memory of the worst stage vs predicted samples/s, one panel per node count; the best five are labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(nodes))
    grid = (len(nodes) + cols - 1) // cols
    fig, axes = plt.subplots(grid, cols, figsize=(6.5 * cols, 5 * grid), squeeze=False)
    for ax in axes.flat[len(nodes):]:
        ax.set_visible(False)
    for ax, n in zip(axes.flat, nodes):
        mine = [r for r in rows if r["nodes"] == n and r["rules_ok"]]
        for ok, color, label in ((False, "#c8c8c8", "infeasible"), (True, "#1f77b4", "feasible")):
            pts = [r for r in mine if bool(r[key]) == ok]
            ax.scatter([r["total_gib"] for r in pts], [r["samples_per_s"] for r in pts], s=7, c=color, label=label)
        for i, r in enumerate(ranked(rows, n, key)[:5]):
            ax.scatter([r["total_gib"]], [r["samples_per_s"]], s=40, c="#d62728", zorder=3)
            ax.annotate(f"{i + 1}. {r['layout']}", (r["total_gib"], r["samples_per_s"]), fontsize=6,
                        xytext=(4, -9 * i), textcoords="offset points")
        ax.axvline(capacity_gib, color="k", lw=0.8, ls="--")
        ax.set_title(f"{n} node{'s' if n > 1 else ''} ({n * 8} × H100)")
        ax.set_xlabel("predicted peak memory, worst stage (GiB)")
        ax.set_ylabel("predicted samples / s")
        ax.set_xlim(0, capacity_gib * 2.5)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"R1V3-38B layouts ({'colocated vLLM' if key == 'feasible_colocated' else 'training only'})")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def single(model, hw: Hardware, rollout: Rollout, args) -> int:
    """Report one layout on `--nodes[0]` nodes: memory per stage, time breakdown, problems."""
    world = args.nodes[0] * hw.gpus_per_node
    dp = world // (args.tp * args.pp * args.cp)
    mbs = args.global_batch // (args.micro_batch * max(dp, 1))
    lay = Layout(tp=args.tp, pp=args.pp, vpp=args.vpp, cp=args.cp, dp=dp, micro_batch=args.micro_batch,
                 num_microbatches=mbs, seq_length=args.seq_length, tiles_per_sample=args.tiles,
                 sequence_parallel=args.tp > 1, recompute=args.recompute, distributed_optimizer=not args.no_dist_opt,
                 fp8=args.fp8, first_stage_layers=args.first_stage_layers)
    c = evaluate(model, lay, hw, rollout if args.rollout == "colocated" else None, args.global_batch)
    from megatron_r1v3.scaling.memory import rank_memory

    print(f"{lay.label()}  ({world} GPUs, {mbs} microbatches of {lay.micro_batch} × {lay.seq_length} tokens)")
    for r in range(lay.pp):
        m = rank_memory(model, lay, r, hw.overhead_bytes)
        print(f"  stage {r}: params {m.params / 1e9:.2f}B  weights {m.weights / GIB:.1f}  grads {m.grads / GIB:.1f}"
              f"  optimizer {m.optimizer / GIB:.1f}  fp8 {m.fp8_cache / GIB:.1f}  activations {m.activations / GIB:.1f}"
              f"  transient {m.transient / GIB:.1f}  overhead {m.overhead / GIB:.1f}  = {m.total / GIB:.1f} GiB")
    print("  time: " + ", ".join(f"{k} {v:.3g}" for k, v in c.time.items()))
    if c.vllm:
        print(f"  vLLM: rollout-phase peak {c.vllm['rollout_peak'] / GIB:.1f} GiB, KV cache {c.vllm['kv_tokens']:.0f}"
              " tokens")
    print("  feasible" if c.feasible else "  NOT feasible: " + "; ".join(c.problems))
    return 0 if c.feasible else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="r1v3-38b")
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--global-batch", type=int, default=1024, help="samples per optimizer step (R1V3 GRPO: 1024)")
    ap.add_argument("--seq-length", type=int, default=12288, help="tokens per sample (prompt + response)")
    ap.add_argument("--tiles", type=int, default=7, help="448px tiles per sample (6 + thumbnail)")
    ap.add_argument("--rollout", choices=["none", "colocated"], default="none", help="which verdict ranks")
    ap.add_argument("--vllm-tp", type=int, default=8)
    ap.add_argument("--gpu-mem-util", type=float, default=0.3, help="vLLM gpu_memory_utilization when colocated")
    ap.add_argument("--mfu", type=float, default=H100.mfu)
    ap.add_argument("--mfu-fp8", type=float, default=H100.mfu_fp8)
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--out-dir", default="runs/scaling")
    for name in ("tp", "pp", "vpp", "first-stage-layers"):
        ap.add_argument(f"--{name}", type=int, default=None, help="single-layout mode")
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--fp8", action="store_true")
    ap.add_argument("--no-dist-opt", action="store_true")
    args = ap.parse_args()
    model = get_preset(args.preset)
    hw = dataclasses.replace(H100, mfu=args.mfu, mfu_fp8=args.mfu_fp8)
    rollout = Rollout(vllm_tp=args.vllm_tp, gpu_memory_utilization=args.gpu_mem_util)
    if args.tp is not None:
        args.pp = args.pp or 1
        return single(model, hw, rollout, args)
    rows = study(model, args.nodes, hw, rollout, args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = "feasible_colocated" if args.rollout == "colocated" else "feasible_training"
    with (out / "layouts.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["nodes"], not r[key], -r["samples_per_s"])))
    plot(rows, args.nodes, key, hw.memory_bytes / GIB, out / "layouts.png")
    mode = "training only"
    if args.rollout == "colocated":
        mode = f"colocated vLLM (TP{args.vllm_tp}, gpu_memory_utilization {args.gpu_mem_util})"
    print(f"{args.preset}: global batch {args.global_batch} × {args.seq_length} tokens, {args.tiles} tiles/sample;"
          f" {hw.name} {hw.memory_bytes / GIB:.1f} GiB, MFU {hw.mfu} (bf16) / {hw.mfu_fp8} (fp8); ranking: {mode}")
    for n in args.nodes:
        best = ranked(rows, n, key)
        total = sum(1 for r in rows if r["nodes"] == n)
        print(f"\n{n} node(s), {n * hw.gpus_per_node} GPUs: {len(best)} of {total} layouts feasible")
        if not best:
            low = min((r for r in rows if r["nodes"] == n), key=lambda r: r["total_gib"])
            print(f"  none fits; least memory: {low['layout']} at {low['total_gib']} GiB ({low['problems']})")
        for i, r in enumerate(best[: args.top]):
            print(f"  {i + 1}. {r['layout']:<44} {r['samples_per_s']:7.3f} samples/s  {r['tokens_per_s']:>8,} tok/s"
                  f"  MFU {r['mfu']:.2f}  step {r['step_s']:.0f}s  mem {r['total_gib']:.1f} GiB (stage"
                  f" {r['worst_stage']})")
    print(f"\nwrote {out / 'layouts.csv'} ({len(rows)} rows) and {out / 'layouts.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
