#!/usr/bin/env python
"""Predicted vs measured memory and step time of tiny R1V3 layouts on CPU (real megatron-core on gloo).

All cases run in ONE launch of `--world` processes (layouts switch with `set_model_parallel`), through the
`r1v3 train-step` code path: build_model -> wrap_ddp -> build_optimizer -> train_step on random_microbatches.
Measured per rank:
  weights    bytes of DDP's param buffers (distributed optimizer) or of the parameters
  grads      bytes of DDP's grad buffers (fp32, grad_reduce_in_fp32)
  optimizer  bytes of every tensor in the optimizer state + fp32 main params not aliasing model storage
  activations  peak, over one whole train_step, of the distinct non-parameter storages autograd holds for
             backward (torch.autograd.graph.saved_tensors_hooks; each storage counted once while referenced)
  step_s     fastest of `--steps` timed train_steps (after a warm-up step)
The 38B preset is also built on the meta device (TP1·PP1 and TP2·PP2 with a lighter first stage) and its
per-rank parameter counts compared with the model's. Prints a markdown table; `--csv` writes one row per stage.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BASE = dict(micro_batch=2, num_microbatches=2, seq_length=64, tiles=2)
CASES = [
    dict(name="TP1·DP4", overrides=[], **BASE),
    dict(name="TP2·DP2", overrides=["parallel.tensor=2"], **BASE),
    dict(name="PP2·DP2", overrides=["parallel.pipeline=2"], **{**BASE, "num_microbatches": 4}),
    dict(name="TP2·PP2", overrides=["parallel.tensor=2", "parallel.pipeline=2"], **{**BASE, "num_microbatches": 4}),
    dict(name="PP2·VPP2·DP2", overrides=["parallel.pipeline=2", "parallel.virtual_pipeline=2"],
         **{**BASE, "num_microbatches": 4}),
    dict(name="TP2·DP2 bf16", overrides=["parallel.tensor=2", "precision.params_dtype=bf16"], **BASE),
    dict(name="TP1·DP4 no dist-opt", overrides=["optimizer.use_distributed_optimizer=false"], **BASE),
    dict(name="TP2·DP2 long", overrides=["parallel.tensor=2"], micro_batch=2, num_microbatches=2, seq_length=512,
         tiles=32),
    dict(name="TP2·DP2 long recompute", overrides=["parallel.tensor=2", "model.activation_recompute=true"],
         micro_batch=2, num_microbatches=2, seq_length=512, tiles=32),
    dict(name="TP2·PP2 long", overrides=["parallel.tensor=2", "parallel.pipeline=2"], micro_batch=1,
         num_microbatches=4, seq_length=512, tiles=32),
    dict(name="TP2·PP2 long recompute", overrides=["parallel.tensor=2", "parallel.pipeline=2",
                                                   "model.activation_recompute=true"],
         micro_batch=1, num_microbatches=4, seq_length=512, tiles=32),
]
META_CASES = [
    dict(name="38B TP1·PP1", overrides=[]),
    dict(name="38B TP2·PP2 first=20", overrides=["parallel.tensor=2", "parallel.pipeline=2",
                                                 "parallel.decoder_layers_in_first_stage=20"]),
]


class SavedTensorPeak:
    """saved_tensors_hooks that track the peak bytes of distinct storages autograd keeps for backward."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.refs, self.sizes, self.live, self.peak = exclude, {}, {}, 0, 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0 or ptr in self.exclude:
            return t
        return _Held(self, t, ptr)

    @staticmethod
    def unpack(x):
        return x.tensor if isinstance(x, _Held) else x


class _Held:
    __slots__ = ("tracker", "tensor", "ptr")

    def __init__(self, tracker: SavedTensorPeak, tensor, ptr: int):
        self.tracker, self.tensor, self.ptr = tracker, tensor, ptr
        refs = tracker.refs.get(ptr, 0)
        if refs == 0:
            tracker.sizes[ptr] = tensor.untyped_storage().nbytes()
            tracker.live += tracker.sizes[ptr]
            tracker.peak = max(tracker.peak, tracker.live)
        tracker.refs[ptr] = refs + 1

    def __del__(self):
        t = self.tracker
        t.refs[self.ptr] -= 1
        if t.refs[self.ptr] == 0:
            t.live -= t.sizes.pop(self.ptr)
            del t.refs[self.ptr]


def _storage_ptrs(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


def _static_bytes(ddp, opt) -> dict[str, int]:
    import torch

    params = [p for c in ddp for p in c.parameters()]
    buffers = [b for c in ddp for b in (*c.buffers, *getattr(c, "expert_parallel_buffers", []))]
    if buffers and all(b.param_data is not None for b in buffers):
        weights = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers)
    else:
        weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    model = _storage_ptrs(params) | _storage_ptrs(b.param_data for b in buffers)
    seen, optim = set(), 0
    for o in getattr(opt, "chained_optimizers", [opt]):
        inner = o.optimizer
        tensors = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v)]
        tensors += [p for g in inner.param_groups for p in g["params"]]
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in model and ptr not in seen:
                seen.add(ptr)
                optim += t.untyped_storage().nbytes()
    return {"weights": weights, "grads": grads, "optimizer": optim}


def _gemm_rate(seconds: float = 0.5) -> float:
    """fp32 FLOP/s of a 256³ matmul on this process's thread(s), measured while every rank does the same."""
    import torch

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 256**3 * n / (time.perf_counter() - t0)


def measure(cases: list[dict], meta_cases: list[dict], steps: int = 2) -> list[dict]:
    """Runs in every spawned rank; rank 0 returns every rank's records (others return [])."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_r1v3.models.build import build_model, count_parameters
    from megatron_r1v3.parallel import init_parallel, set_model_parallel
    from megatron_r1v3.parallel.phase import set_phase
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.random_batch import random_microbatches
    from megatron_r1v3.training.step import train_step

    def setup(preset: str, overrides: list[str]):
        cfg = load_config(None, [f"model.preset={preset}", *overrides])
        return cfg, (set_model_parallel(cfg) if dist.is_initialized() else init_parallel(cfg))

    records = []
    for case in meta_cases:
        set_phase(f"meta {case['name']}")
        cfg, state = setup("r1v3-38b", case["overrides"])
        counts = dict(count_parameters(build_model(cfg, meta=True)))
        records.append(dict(case=case["name"], kind="meta", rank=state.rank, tp_rank=state.tp_rank,
                            pp_rank=state.pp_rank, dp_rank=state.dp_rank, dp=state.dp, params=counts))
    dist.barrier()
    rate = _gemm_rate()
    for case in cases:
        set_phase(f"measure {case['name']}: build")
        cfg, state = setup("tiny", case["overrides"])
        chunks = build_model(cfg)
        ddp = wrap_ddp(chunks, cfg)
        opt = build_optimizer(ddp, cfg)
        mbs = random_microbatches(cfg.model, case["num_microbatches"] * state.dp, case["micro_batch"],
                                  case["seq_length"], case["tiles"], seed=cfg.seed)[state.dp_rank :: state.dp]
        set_phase(f"measure {case['name']}: steps")
        train_step(ddp, opt, mbs)  # warm-up; allocates Adam states
        params = [p for c in ddp for p in c.parameters()]
        exclude = _storage_ptrs(params) | _storage_ptrs(b.param_data for c in ddp for b in c.buffers)
        tracker = SavedTensorPeak(exclude)
        with torch.autograd.graph.saved_tensors_hooks(tracker.pack, tracker.unpack):
            train_step(ddp, opt, mbs)
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(ddp, opt, mbs)
            times.append(time.perf_counter() - t0)
        records.append(dict(
            case=case["name"], kind="tiny", rank=state.rank, tp_rank=state.tp_rank, pp_rank=state.pp_rank,
            dp_rank=state.dp_rank, dp=state.dp, params=dict(count_parameters(chunks)), activations=tracker.peak,
            step_s=min(times), gemm_flops=rate, **_static_bytes(ddp, opt),
        ))
        del ddp, opt, chunks
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    ps.destroy_model_parallel()
    return [r for rank in gathered for r in rank] if dist.get_rank() == 0 else []


def predict(case: dict, preset: str, dp: int):
    """The model's Layout and RunConfig for a case (impl=local: megatron-core local spec, unfused attention)."""
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.scaling.layouts import layout_from_config

    cfg = load_config(None, [f"model.preset={preset}", *case["overrides"]])
    layout = layout_from_config(cfg, dp, case.get("micro_batch", 1), case.get("num_microbatches", 1),
                                case.get("seq_length", 64), case.get("tiles", 1), impl="local")
    return cfg, layout


def compare(records: list[dict], world: int) -> tuple[list[dict], list[str]]:
    """Rows (case, stage) of predicted vs measured, and the parameter-count mismatches (empty = all exact)."""
    from megatron_r1v3.scaling.compute import Hardware, step_time
    from megatron_r1v3.scaling.memory import rank_memory, rank_parameters

    rows, mismatches = [], []
    for r in records:
        preset = "r1v3-38b" if r["kind"] == "meta" else "tiny"
        case = next(c for c in (CASES if r["kind"] == "tiny" else META_CASES) if c["name"] == r["case"])
        cfg, layout = predict(case, preset, r["dp"])
        want = {k: v for k, v in rank_parameters(cfg.model, layout, r["pp_rank"]).items() if v}
        if want != r["params"]:
            mismatches.append(f"{r['case']} rank {r['rank']}: predicted {want} measured {r['params']}")
        if r["kind"] != "tiny" or r["tp_rank"] or r["dp_rank"]:
            continue
        mem = rank_memory(cfg.model, layout, r["pp_rank"])
        cpu = Hardware(name="cpu", peak_bf16=r["gemm_flops"], peak_fp8=r["gemm_flops"], mfu=1.0,
                       gpus_per_node=world, intra_node_bw=1.7e9, inter_node_bw=1.7e9, hbm_bw=5e9)
        row = dict(case=r["case"], stage=r["pp_rank"], params=sum(r["params"].values()))
        for key in ("weights", "grads", "optimizer", "activations"):
            row[f"{key}_pred"], row[f"{key}_meas"] = getattr(mem, key), r[key]
        row["total_pred"] = mem.weights + mem.grads + mem.optimizer + mem.activations
        row["total_meas"] = sum(r[k] for k in ("weights", "grads", "optimizer", "activations"))
        row["step_pred"], row["step_meas"] = step_time(cfg.model, layout, cpu)["step_s"], r["step_s"]
        rows.append(row)
    return rows, mismatches


def error(pred: float, meas: float) -> float:
    """Relative error of a prediction, in percent of the measurement."""
    return 100.0 * (pred - meas) / meas if meas else 0.0


def markdown(rows: list[dict]) -> str:
    """The predicted-vs-measured table (KiB, % error) as in docs/scaling.md."""
    head = ("| layout | stage | weights KiB | grads KiB | optimizer KiB | activations KiB pred / meas (err) "
            "| total KiB pred / meas (err) | step ms pred / meas (implied MFU) |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        cells = [r["case"], str(r["stage"])]
        for key in ("weights", "grads", "optimizer"):
            cells.append(f"{r[f'{key}_pred'] / 1024:.0f} / {r[f'{key}_meas'] / 1024:.0f}")
        for key in ("activations", "total"):
            p, m = r[f"{key}_pred"], r[f"{key}_meas"]
            cells.append(f"{p / 1024:.0f} / {m / 1024:.0f} ({error(p, m):+.1f}%)")
        implied = r["step_pred"] / r["step_meas"]  # prediction assumes MFU 1 of the measured GEMM rate
        cells.append(f"{r['step_pred'] * 1e3:.1f} / {r['step_meas'] * 1e3:.0f} ({implied:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--csv", default="runs/scaling/validation.csv")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args()
    from megatron_r1v3.parallel.spawn import run_distributed

    t0 = time.perf_counter()
    records = run_distributed("tools.validate_scaling:measure", args.world, timeout_s=args.timeout,
                              cases=CASES, meta_cases=META_CASES,
                              steps=args.steps)[0]
    rows, mismatches = compare(records, args.world)
    print(f"measured {len(CASES)} tiny layouts + {len(META_CASES)} 38B meta builds on {args.world} processes"
          f" in {time.perf_counter() - t0:.0f}s")
    print("parameter counts per rank: " + ("all exact" if not mismatches else "\n  ".join(["MISMATCH", *mismatches])))
    print(markdown(rows))
    worst = max(abs(error(r["total_pred"], r["total_meas"])) for r in rows)
    print(f"worst total-memory error: {worst:.1f}%")
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
    return 0 if not mismatches and worst <= 25 else 1


if __name__ == "__main__":
    sys.exit(main())
