#!/usr/bin/env python
"""One-GPU check of the H100 path: what only a GPU can show, in one command of a few minutes.

On one H100/H200 box (NCCL, world size 1) with only torch + megatron-core + numpy + safetensors + omegaconf (+ the
small pure-Python dependencies), an R1V3-shaped model with the 38B layer widths (ViT 3200 / 25 heads padded to 32,
decoder 5120 / 40:8 heads, FFN 27648, the real vocab) and few layers, in bf16 with fp32 main params:
  (a) SFT steps on synthetic image batches (a fixed set, so the loss must fall): tokens/s and MFU;
  (b) one GRPO step (old-logprob pass, policy loss, optimizer step) on synthetic rollouts;
  (c) the FP8 vs BF16 GEMMs of tools/fp8_bench.py at the 38B per-rank shapes;
  (d) peak memory measured vs the scaling model's prediction for the same layout;
  (e) the CUDA-IPC bucket transport (`rollout/ipc.py`): the model's bf16 parameters packed into one device buffer,
      its IPC handle opened by a spawned process on the same GPU, every tensor's checksum equal on both sides.
Prints each row as it is measured and writes `<out>/gpu_check.json`. Without a GPU it refuses, naming what is
missing; `--cpu-smoke` runs the same code path with the tiny model on CPU (what `make test` checks).

  python tools/gpu_check.py --out runs/gpu_check
  python tools/gpu_check.py --cpu-smoke --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `tools.fp8_bench` and the package from a checkout

REQUIRED = ("megatron.core", "omegaconf", "safetensors", "numpy")


def missing_requirements(cpu_smoke: bool) -> list[str]:
    """What this machine lacks for the check (empty = it can run)."""
    missing = []
    try:
        import torch
    except ImportError:
        return ["torch is not importable"]
    if not cpu_smoke and not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible (this check measures an H100/H200; use --cpu-smoke on a CPU box)")
    for name in REQUIRED:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(f"{name} is not installed")
    return missing


def build_config(args):
    from megatron_r1v3.presets import load_config

    if args.cpu_smoke:
        model = ["model.preset=tiny"]
    else:
        model = ["model.preset=r1v3-38b", f"model.vision.num_layers={args.vit_layers}",
                 f"model.language.num_layers={args.decoder_layers}"]
    return load_config(None, [*model, "parallel.launcher=none", f"precision.params_dtype={args.dtype}",
                              "optimizer.name=adam", f"optimizer.lr={args.lr}", "optimizer.warmup_fraction=0",
                              f"data.seq_length={args.seq}", f"train.micro_batch_size={args.micro_batch}",
                              f"train.global_batch_size={args.micro_batch * args.microbatches}",
                              "rl.agg=token-mean", f"seed={args.seed}"])


class Report:
    """Rows printed as they come; everything kept for the JSON (rewritten after each section)."""

    def __init__(self, out: Path):
        self.out, self.data = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def row(self, section: str, text: str, **values) -> None:
        print(f"[{section}] {text}", flush=True)
        self.data.setdefault(section, []).append(values)
        (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=2, default=str))


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def sft_section(cfg, args, ddp, optimizer, report: Report) -> dict:
    """(a) SFT steps on a fixed set of synthetic batches: loss, tokens/s, MFU."""
    from megatron_r1v3.scaling.compute import model_flops_per_sample
    from megatron_r1v3.training.random_batch import random_microbatches
    from megatron_r1v3.training.step import train_step

    batches = random_microbatches(cfg.model, 2 * args.microbatches, args.micro_batch, args.seq, args.tiles, args.seed)
    flops = model_flops_per_sample(cfg.model, args.seq, args.tiles) * args.micro_batch * args.microbatches
    losses, seconds = [], []
    for step in range(args.steps):
        start = (step % 2) * args.microbatches
        _synchronize()
        t0 = time.perf_counter()
        metrics = train_step(ddp, optimizer, batches[start:start + args.microbatches])
        _synchronize()
        seconds.append(time.perf_counter() - t0)
        losses.append(metrics["loss"])
        tokens = args.micro_batch * args.microbatches * args.seq / seconds[-1]
        tflops = flops / seconds[-1] / 1e12
        report.row("sft", f"step {step + 1}: loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
                   f"{seconds[-1]:.2f}s  {tokens:,.0f} tok/s  {tflops:.1f} TFLOP/s  MFU {tflops / args.peak:.1%}",
                   step=step + 1, loss=metrics["loss"], grad_norm=metrics["grad_norm"], seconds=seconds[-1],
                   tokens_per_s=tokens, tflops=tflops, mfu=tflops / args.peak)
    steady = seconds[2:] or seconds
    k = max(1, len(losses) // 4)
    summary = {"loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k,
               "step_seconds": sum(steady) / len(steady),
               "tokens_per_s": args.micro_batch * args.microbatches * args.seq * len(steady) / sum(steady),
               "mfu": flops * len(steady) / sum(steady) / 1e12 / args.peak}
    summary["loss_falls"] = summary["loss_last"] < summary["loss_first"]
    report.row("sft", f"summary: loss {summary['loss_first']:.3f} -> {summary['loss_last']:.3f} "
               f"({'falls' if summary['loss_falls'] else 'DOES NOT FALL'}), {summary['tokens_per_s']:,.0f} tok/s, "
               f"MFU {summary['mfu']:.1%} (steps 3+)", summary=summary)
    return summary


def grpo_section(cfg, args, run_state, ddp, optimizer, report: Report) -> dict:
    """(b) One GRPO step: rows of two groups with image prompts -> old logprobs -> policy loss -> optimizer step."""
    import torch

    from megatron_r1v3.rl.batch import Rollout, episode_microbatches
    from megatron_r1v3.rl.policy_loss import count_units, loss_function, write_logprobs
    from megatron_r1v3.training.random_batch import random_text_ids
    from megatron_r1v3.training.step import train_step

    m = cfg.model
    g = torch.Generator().manual_seed(args.seed)
    n_img = args.tiles * m.tokens_per_tile
    prompt = [m.image_start_token_id] + [m.image_context_token_id] * n_img + [m.image_end_token_id]
    prompt += random_text_ids(m, (16,), g).tolist()
    response = max(8, args.seq - len(prompt) - 8)
    pixels = {i: torch.randn(args.tiles, 3, m.vision.image_size, m.vision.image_size, generator=g) for i in range(2)}
    advantages = (1.0, -0.6, 0.4, -0.8)
    rows = [Rollout(i // 2, prompt, random_text_ids(m, (response - 4 * i,), g).tolist(), [-3.0] * (response - 4 * i),
                    0.0, 0.0, 0.0, "stop", 1, advantage=a)
            for i, a in enumerate(advantages)]
    _synchronize()
    t0 = time.perf_counter()
    mbs = episode_microbatches(rows, run_state, args.micro_batch, m, pixels.__getitem__, 1)
    write_logprobs(ddp, mbs, "old_logp")
    metrics = train_step(ddp, optimizer, mbs, loss_function(cfg.rl, count_units(mbs, cfg.rl.agg), len(mbs)))
    _synchronize()
    out = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "update_ok": metrics["update_ok"],
           "seconds": time.perf_counter() - t0, "rows": len(rows), "seq": int(mbs[0]["input_ids"].shape[1])}
    report.row("grpo", f"step: loss {out['loss']:.4f}  grad_norm {out['grad_norm']:.3f}  update_ok {out['update_ok']}"
               f"  {out['seconds']:.2f}s ({out['rows']} rows of {out['seq']} tokens)", **out)
    return out


def fp8_section(args, report: Report) -> None:
    """(c) FP8 vs BF16 GEMMs at the 38B per-rank shapes (TP1 and TP8) through tools/fp8_bench.py."""
    import torch

    from tools import fp8_bench

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        report.row("fp8", "skipped: needs an sm_89+ GPU (FP8 tensor cores)", skipped=True)
        return
    te = fp8_bench._te()
    peak = fp8_bench.PEAKS["H200" if "H200" in torch.cuda.get_device_name() else "H100"]
    for tp in (1, 8):
        for gemm in fp8_bench.r1v3_gemms(tp):
            r = fp8_bench.gemm_row(tp, gemm, args.fp8_tokens, *fp8_bench.bench_gemm(gemm, args.fp8_tokens, te), peak)
            report.row("fp8", fp8_bench.format_gemm_row(r), **r)


def memory_section(cfg, args, sft_peak: float | None, report: Report) -> None:
    """(d) Peak memory of the SFT steps vs `scaling.memory` for the same layout (CUDA context excluded; on CPU the
    prediction alone)."""
    from megatron_r1v3.models.specs import use_transformer_engine
    from megatron_r1v3.scaling.memory import GIB, Layout, rank_memory

    layout = Layout(micro_batch=args.micro_batch, num_microbatches=args.microbatches, seq_length=args.seq,
                    tiles_per_sample=args.tiles, params_dtype=args.dtype,
                    impl="te" if use_transformer_engine(cfg) else "local")
    predicted = rank_memory(cfg.model, layout, 0)
    parts = {k: getattr(predicted, k) / GIB for k in ("weights", "grads", "optimizer", "activations", "transient")}
    measured = f"{sft_peak / GIB:.2f} GiB" if sft_peak is not None else "not measured (CPU)"
    ratio = sft_peak / predicted.total if sft_peak is not None else None
    report.row("memory", f"peak allocated {measured} vs predicted {predicted.total / GIB:.2f} GiB ("
               + (f"ratio {ratio:.3f}; " if ratio is not None else "") + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                                  parts.items()) + ")",
               measured_gib=None if sft_peak is None else sft_peak / GIB, predicted_gib=predicted.total / GIB,
               ratio=ratio, predicted_parts_gib=parts, layout=layout.label())


def _checksums(tensors) -> list[int]:
    """Position-weighted byte sums (exact integers: equal only for the same bytes in the same order)."""
    import torch

    out, step = [], 1 << 24  # 16 MiB of bytes at a time: int64 temporaries of 128 MiB, whatever the tensor's size
    for _, t in tensors:
        flat, total = t.detach().contiguous().reshape(-1).view(torch.uint8), 0
        for i in range(0, flat.numel(), step):
            b = flat[i:i + step].to(torch.int64)
            total += int((b * ((torch.arange(b.numel(), device=b.device) + i) % 65521 + 1)).sum())
        out.append(total)
    return out


def _ipc_receiver(handle, layout, conn) -> None:
    """The other process of (e): open the handle (no copy), view the bucket, send back the checksums."""
    import torch

    from megatron_r1v3.rollout.ipc import open_handle, unpack_bucket

    t0 = time.perf_counter()
    buffer = open_handle(handle)
    opened = time.perf_counter() - t0
    sums = _checksums(unpack_bucket(buffer, layout))
    torch.cuda.synchronize()
    conn.send((sums, opened, str(buffer.device)))


def ipc_section(chunks, report: Report) -> dict:
    """(e) CUDA-IPC: pack every parameter (bf16) into one buffer, hand its handle to a spawned process, which must
    see the same bytes. On CPU: the pack/unpack round trip, and the refusal of a CPU buffer."""
    import multiprocessing as mp

    import torch

    from megatron_r1v3.rollout.ipc import pack_bucket, share_handle, unpack_bucket

    params = [(n, p.detach().to(torch.bfloat16)) for chunk in chunks for n, p in chunk.named_parameters()]
    _synchronize()
    t0 = time.perf_counter()
    buffer, layout = pack_bucket(params)
    _synchronize()
    pack_s = time.perf_counter() - t0
    want = _checksums(params)
    size = f"{len(params)} tensors, {layout.nbytes / 2**20:.1f} MiB, packed at {layout.nbytes / pack_s / 1e9:.1f} GB/s"
    if not buffer.is_cuda:
        roundtrip = _checksums(unpack_bucket(buffer, layout)) == want
        try:
            share_handle(buffer)
            refused = False
        except ValueError:
            refused = True
        report.row("ipc", f"CPU: {size}; round trip {'exact' if roundtrip else 'WRONG'}; a CPU buffer's handle "
                   f"{'refused' if refused else 'NOT REFUSED'} (the IPC figures need a GPU)", skipped=True,
                   roundtrip_ok=roundtrip, refused_cpu=refused)
        return {"ok": roundtrip and refused}
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=_ipc_receiver, args=(share_handle(buffer), layout, theirs))
    t0 = time.perf_counter()
    proc.start()
    got = mine.recv() if mine.poll(300) else None
    proc.join(30)
    if got is None:
        proc.kill()
        report.row("ipc", f"FAILED: the receiving process sent nothing in 300 s (exit code {proc.exitcode})", ok=False)
        return {"ok": False}
    sums, opened_s, device = got
    ok = sums == want
    bad = [name for (name, _), a, b in zip(params, sums, want) if a != b]
    verdict = "equal" if ok else f"DIFFER: {bad[:5]}"
    report.row("ipc", f"{size}; opened in the other process ({device}) in {opened_s * 1e3:.1f} ms, whole exchange "
               f"{time.perf_counter() - t0:.1f} s incl. its start; bytes {verdict}",
               ok=ok, tensors=len(params), nbytes=layout.nbytes, pack_s=pack_s, open_s=opened_s, differ=bad)
    return {"ok": ok}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu_check")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU: the same code path, no figures")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--vit-layers", type=int, default=2)
    ap.add_argument("--decoder-layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--tiles", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--microbatches", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--fp8-tokens", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    missing = missing_requirements(args.cpu_smoke)
    if missing:
        print("gpu_check: cannot run here: " + "; ".join(missing), file=sys.stderr)
        return 2
    if args.cpu_smoke:
        args.seq, args.tiles, args.steps = min(args.seq, 64), min(args.tiles, 2), min(args.steps, 4)
    import torch

    from megatron_r1v3.parallel import setup_process

    setup_process()
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import destroy_parallel, init_parallel
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp

    on_gpu = torch.cuda.is_available() and not args.cpu_smoke
    args.dtype = "bf16"
    args.peak = 989.4 if on_gpu else 1.0  # dense BF16 TFLOP/s of H100/H200 SXM (CPU smoke: a placeholder)
    report = Report(Path(args.out))
    cfg = build_config(args)
    device = torch.cuda.get_device_name() if on_gpu else "CPU (smoke run: no figures)"
    vit, lm = cfg.model.vision, cfg.model.language
    report.row("setup", f"{device}; torch {torch.__version__}; model {cfg.model.preset} ViT {vit.num_layers}"
               f"L/{vit.hidden_size}, decoder {lm.num_layers}L/"
               f"{lm.hidden_size}; seq {args.seq}, {args.tiles} tiles, mb {args.micro_batch} x "
               f"{args.microbatches}; {args.dtype}", device=device, torch=torch.__version__, args=vars(args))
    state = init_parallel(cfg)
    chunks = build_model(cfg)
    ddp = wrap_ddp(chunks, cfg)
    optimizer = build_optimizer(ddp, cfg)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sft = sft_section(cfg, args, ddp, optimizer, report)
    sft_peak = torch.cuda.max_memory_allocated() if on_gpu else None
    grpo = grpo_section(cfg, args, state, ddp, optimizer, report)
    memory_section(cfg, args, sft_peak, report)
    fp8_section(args, report)
    ipc = ipc_section(chunks, report)
    destroy_parallel()
    ok = sft["loss_falls"] and grpo["update_ok"] and ipc["ok"]
    report.row("result", "OK" if ok else "FAILED (see above)", ok=ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
