#!/usr/bin/env python
"""Refit speed and RL step overhead, measured in one run on this machine (issue 5). Needs vLLM (the vLLM venv).

1. Refit ratio, a decoder of a few hundred MB (fp32 on CPU) trained at TP2·PP2 (4 gloo processes), engine on rank 0:
     refit    = wall time of `rollout.refit.push_weights` (the HF-named stream to rank 0 through the mapping table,
                manifest check, vLLM `reload_weights` bucket by bucket, cache reset), for both transports of
                `bridge.export`: shared memory (the default on one host) and point-to-point (gloo gather + send);
     baseline = one in-memory copy of all weights on rank 0: `dst.copy_(src)` into preallocated tensors, and
                `src.clone()` (allocating, as a fresh state dict would); both printed.
   Target: refit / baseline <= 3.
   `--spmd`: the SPMD engines (2 engines x rollout TP2, `rollout.spmd_refit`): per rank, our part of a push
   (gather + mapping + transport, vLLM's load excluded) / one `copy_` of the bytes that rank receives, all ranks
   at once (target <= 2); vLLM's `reload_weights` time beside it; a frozen-ViT refit's bytes / a full refit's.
2. RL overhead: a short GRPO run of the tiny model (TP2, 2 processes); per step, the time outside generation,
   the trainer's forward/backward/optimizer step and the refit, as a fraction of the step. Target <= 5%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}
BIG = ["model.preset=tiny", "parallel.tensor=2", "parallel.pipeline=2", "model.language.num_layers=8",
       "model.language.hidden_size=1024", "model.language.ffn_hidden_size=2816", "model.language.num_heads=16",
       "model.language.num_kv_heads=4"]


def refit_worker(workdir: str, repeats: int, bucket_mb: int) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_r1v3.bridge.export import iter_hf_tensors
    from megatron_r1v3.bridge.mapping import expected_hf_names
    from megatron_r1v3.config import torch_dtype
    from megatron_r1v3.data.tokenizer import toy_tokenizer
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rollout.engine import RolloutEngine, rollout_dtype
    from megatron_r1v3.rollout.hf_export import write_vllm_model_dir
    from megatron_r1v3.rollout.refit import push_weights

    cfg = load_config(None, BIG)
    init_parallel(cfg)
    rank = dist.get_rank()
    chunks = build_model(cfg)
    names = list(expected_hf_names(cfg.model, "native"))
    engine = None
    if rank == 0:
        tok = toy_tokenizer(f"{workdir}/tok")
        dtype = rollout_dtype(cfg.rl.rollout_dtype)  # auto: fp32 on CPU, bf16 on GPU
        model_dir = write_vllm_model_dir(f"{workdir}/vllm", cfg.model, tok, torch_dtype(dtype), seed=1, max_tiles=4)
        engine = RolloutEngine(model_dir, max_model_len=256, kv_cache_bytes=64 * 2**20, dtype=dtype)
    dist.barrier()
    times, loads, stats = {}, {}, None
    for transport in ("shm", "p2p"):
        stream = iter_hf_tensors(chunks, cfg.model, "native", transport=transport)
        push_weights(engine, stream, names, bucket_bytes=bucket_mb * 2**20)  # warm-up
        times[transport], loads[transport] = [], []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            stats = push_weights(engine, iter_hf_tensors(chunks, cfg.model, "native", transport=transport), names,
                                 bucket_bytes=bucket_mb * 2**20)
            dist.barrier()
            times[transport].append(time.perf_counter() - t0)
            loads[transport].append(stats.load_seconds)
    full = [(n, t.clone()) for n, t in iter_hf_tensors(chunks, cfg.model, "native")]  # collective
    out = {}
    if rank == 0:
        dst = [torch.empty_like(t) for _, t in full]
        copies, clones = [], []
        for _ in range(max(repeats, 3)):
            t0 = time.perf_counter()
            for d, (_, t) in zip(dst, full):
                d.copy_(t)
            copies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            fresh = [t.clone() for _, t in full]  # with allocation (first-touch page faults), like a new state dict
            clones.append(time.perf_counter() - t0)
            del fresh
        out = {"refit_s": {k: statistics.median(v) for k, v in times.items()},
               "load_s": {k: statistics.median(v) for k, v in loads.items()}, "copy_s": statistics.median(copies),
               "clone_s": statistics.median(clones), "bytes": stats.bytes, "tensors": stats.tensors,
               "buckets": stats.buckets, "dtype": str(full[0][1].dtype).replace("torch.", "")}
        engine.close()
    dist.barrier()
    return out


def spmd_refit_worker(workdir: str, repeats: int, bucket_mb: int) -> dict:
    """The SPMD path: 2 engines x rollout TP2 over the 4 ranks, dummy start, every rank loading its own stream."""
    import torch
    import torch.distributed as dist

    from megatron_r1v3.data.tokenizer import toy_tokenizer
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rollout.engine_group import EngineLayout, start_engine, write_dummy_model_dir
    from megatron_r1v3.rollout.spmd_refit import EngineRefit, iter_engine_tensors, plan_refit
    from megatron_r1v3.training.freeze import apply_trainable

    cfg = load_config(None, BIG)
    init_parallel(cfg)
    rank = dist.get_rank()
    chunks = build_model(cfg)
    if rank == 0:
        write_dummy_model_dir(f"{workdir}/dummy", cfg.model, toy_tokenizer(f"{workdir}/tok"), torch.float32)
    dist.barrier()
    engine = start_engine(EngineLayout(4, 2), f"{workdir}/dummy", max_model_len=256, kv_cache_bytes=64 * 2**20,
                          dtype="fp32", load_format="dummy")
    out = {}
    for mode, sliced in (("sliced", True), ("whole", False)):
        refit = EngineRefit(chunks, cfg.model, bucket_mb, freeze_aware=False, engine_tp=2, sliced=sliced)
        refit(engine, chunks)  # warm-up (and the first, full push)
        times, loads, ours = [], [], []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            stats = refit(engine, chunks)
            dist.barrier()
            times.append(time.perf_counter() - t0)
            loads.append(stats.load_seconds)
            # our part alone: the same push with no engine (gather + mapping + transport + manifest, no vLLM)
            dist.barrier()
            t0 = time.perf_counter()
            refit(None, chunks)
            ours.append(time.perf_counter() - t0)
        # the baseline: one copy_ of the bytes this rank receives, tensor by tensor as pushed (slices: a tensor of
        # each slice's size)
        received, src = [0], []
        for _, t in iter_engine_tensors(chunks, refit.manifests, plan_refit(refit.manifests, cfg.model, True),
                                        cfg.model, sliced=refit.sliced, received=received):
            nbytes, received[0] = received[0], 0
            src.append(t.clone() if nbytes == t.numel() * t.element_size() else
                       torch.empty(nbytes, dtype=torch.uint8).random_())
        dst = [torch.empty_like(t) for t in src]
        copies = []
        for _ in range(max(repeats, 3)):
            dist.barrier()  # every rank copies at once, as every rank pushes at once
            t0 = time.perf_counter()
            for d, t in zip(dst, src):
                d.copy_(t)
            copies.append(time.perf_counter() - t0)
        out[mode] = {"refit_s": statistics.median(times), "ours_s": statistics.median(ours),
                     "load_s": statistics.median(loads), "copy_s": statistics.median(copies), "bytes": stats.bytes,
                     "received_bytes": stats.received_bytes, "tensors": stats.tensors, "buckets": stats.buckets,
                     "sliced_tensors": len(refit.sliced)}
    apply_trainable(chunks, "freeze_vision")
    frozen = EngineRefit(chunks, cfg.model, bucket_mb, engine_tp=2)
    frozen.pushes = 1  # a later refit
    received = [0]
    for _ in iter_engine_tensors(chunks, frozen.manifests, frozen.plan(), cfg.model, sliced=frozen.sliced,
                                 received=received):
        pass
    engine.close()
    return {**out, "frozen_vit_received": received[0], "frozen_vit_tensors": len(frozen.plan().expected)}


def rl_worker(workdir: str, steps: int) -> dict:
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.grpo import run_grpo

    cfg = load_config("examples/tiny_cpu_rl.yaml", [
        f"output_dir={workdir}/rl", f"data.toy_dir={workdir}/toy", f"train.steps={steps}", "rl.eval_every=0",
        "rl.eval_prompts=8", "checkpoint.save_every=0", "logging.tensorboard=false", "logging.progress=false"])
    result = run_grpo(cfg)
    rows = result["history"]["train"][1:]  # the first step warms up caches
    keys = ("time/step", "time/generate", "time/forward_backward_step", "refit/seconds", "time/reward",
            "time/overhead_fraction")
    return {k: statistics.mean(r[k] for r in rows) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=512, help="rl.refit_bucket_mb (its default: 512)")
    ap.add_argument("--rl-steps", type=int, default=8)
    ap.add_argument("--spmd", action="store_true", help="the SPMD engines' refit (rl.rollout_tp=2) instead")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spawned ranks import tools.bench_refit
    from megatron_r1v3.parallel.spawn import run_distributed

    if args.spmd:
        with tempfile.TemporaryDirectory(prefix="r1v3-bench-spmd-") as wd:
            ranks = run_distributed("tools.bench_refit:spmd_refit_worker", 4, timeout_s=900, env=ENV, workdir=wd,
                                    repeats=args.repeats, bucket_mb=args.bucket_mb)
        r = ranks[0]
        for mode in ("sliced", "whole"):
            m = r[mode]
            print(f"SPMD refit, {mode}: 2 engines x rollout TP2 over TP2·PP2 (4 ranks), every rank hands vLLM "
                  f"{m['tensors']} tensors ({m['bytes'] / 2**20:.0f} MiB fp32, {m['buckets']} buckets of <= "
                  f"{args.bucket_mb} MiB) and receives {m['received_bytes'] / 2**20:.0f} MiB"
                  + (f" ({m['sliced_tensors']} Megatron tensors as its own TP slice)" if mode == "sliced" else ""))
            for k, x in enumerate(ranks):
                x = x[mode]
                print(f"  rank {k}: push {x['refit_s']:.3f} s, vLLM reload_weights {x['load_s']:.3f} s, ours (gather"
                      f" + mapping + transport) {x['ours_s']:.3f} s; one copy_ of the received bytes "
                      f"{x['copy_s']:.3f} s -> ours / copy_ {x['ours_s'] / x['copy_s']:.2f} (target <= 2)")
        s, w = r["sliced"], r["whole"]
        print(f"  sliced / whole, rank 0: bytes received {s['received_bytes'] / w['received_bytes']:.3f}, our part "
              f"{s['ours_s'] / w['ours_s']:.3f}, push {s['refit_s'] / w['refit_s']:.3f}")
        print(f"  frozen ViT (sliced): later refits carry {r['frozen_vit_tensors']} HF tensors, rank 0 receives "
              f"{r['frozen_vit_received']} of {s['received_bytes']} bytes "
              f"({r['frozen_vit_received'] / s['received_bytes']:.3f} of a full sliced refit)")
        return

    with tempfile.TemporaryDirectory(prefix="r1v3-bench-refit-") as wd:
        r = run_distributed("tools.bench_refit:refit_worker", 4, timeout_s=900, env=ENV, workdir=wd,
                            repeats=args.repeats, bucket_mb=args.bucket_mb)[0]
        rl = run_distributed("tools.bench_refit:rl_worker", 2, timeout_s=900, env=ENV, workdir=wd,
                             steps=args.rl_steps)[0]
    mb = r["bytes"] / 2**20
    print(f"refit: {r['tensors']} tensors, {mb:.0f} MiB {r['dtype']} at TP2·PP2, {r['buckets']} buckets of <= "
          f"{args.bucket_mb} MiB")
    print(f"  one in-memory copy: into preallocated tensors (copy_) {r['copy_s']:.3f} s; allocating (clone) "
          f"{r['clone_s']:.3f} s")
    for t in ("shm", "p2p"):
        refit, load = r["refit_s"][t], r["load_s"][t]
        print(f"  refit ({t}) {refit:.3f} s, of which vLLM reload_weights {load:.3f} s -> ratio "
              f"{refit / r['copy_s']:.1f} vs copy_, {refit / r['clone_s']:.1f} vs clone (target <= 3); "
              f"ours without vLLM's reload: {(refit - load) / r['copy_s']:.1f} vs copy_")
    print(f"RL step (tiny, TP2, {args.rl_steps} steps, first dropped): step {rl['time/step']:.3f} s = generate "
          f"{rl['time/generate']:.3f} + forward/backward/step {rl['time/forward_backward_step']:.3f} + refit "
          f"{rl['refit/seconds']:.3f} + rest (reward {rl['time/reward']:.3f}, batching, broadcast, logging)")
    print(f"  overhead fraction {rl['time/overhead_fraction']:.1%} (target <= 5%)")


if __name__ == "__main__":
    main()
