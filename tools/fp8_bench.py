#!/usr/bin/env python
"""FP8 vs BF16 throughput of R1V3-38B's GEMMs and of one megatron-core decoder layer, on one GPU.

For every GEMM of the model (ViT qkv/proj/fc1/fc2, connector fc1/fc2, decoder qkv/proj/fc1/fc2) at TP 1/2/4/8 (the
per-rank shard shapes), for `--tokens` rows: BF16 and FP8 TFLOP/s and MFU against the device's dense peak. Both
precisions go through the same module: Transformer Engine's `te.Linear` (FP8 = the same layer under `fp8_autocast`)
when TE imports, else `torch.mm` vs `torch._scaled_mm` with per-tensor scales (E4M3 inputs, BF16 output); the table
says which. Then a whole megatron-core decoder layer (forward + backward, BF16, and FP8 where TE is present; without
Apex megatron's fused softmax is off, see `models.specs.fusion_flags`). Each row is printed as it is measured.
Refuses clearly without a CUDA GPU.

    python tools/fp8_bench.py [--tokens 8192] [--tp 1 2 4 8] [--layer-seq 4096] [--markdown out.md] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Dense peaks (TFLOP/s, no sparsity) from NVIDIA's H100 SXM / H200 datasheets.
PEAKS = {"H100": {"bf16": 989.4, "fp8": 1978.9}, "H200": {"bf16": 989.4, "fp8": 1978.9}}


@dataclass(frozen=True)
class Gemm:
    """y[M, N] = x[M, K] @ w[K, N] on one TP rank."""

    name: str
    k: int
    n: int


def r1v3_gemms(tp: int, vision_heads: int = 32, head_dim: int = 128) -> list[Gemm]:
    """Per-rank GEMM shapes of R1V3-38B (ViT with its 25 heads padded to 32; GQA decoder; gate+up fused)."""
    vit, vit_ffn, lm, lm_ffn = 3200, 12800, 5120, 27648
    vit_width = vision_heads * head_dim
    q_heads, kv_heads = 40, 8
    return [
        Gemm("vit.qkv", vit, 3 * vit_width // tp),
        Gemm("vit.proj", vit_width // tp, vit),
        Gemm("vit.fc1", vit, vit_ffn // tp),
        Gemm("vit.fc2", vit_ffn // tp, vit),
        Gemm("connector.fc1", 4 * vit, lm // tp),
        Gemm("connector.fc2", lm // tp, lm),
        Gemm("decoder.qkv", lm, (q_heads + 2 * kv_heads) * head_dim // tp),
        Gemm("decoder.proj", lm // tp, lm),
        Gemm("decoder.fc1", lm, 2 * lm_ffn // tp),
        Gemm("decoder.fc2", lm_ffn // tp, lm),
    ]


def _time(fn, iters: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def _te():
    try:
        import transformer_engine.pytorch as te

        return te
    except Exception:
        return None


def _te_recipe():
    from transformer_engine.common.recipe import DelayedScaling, Format

    return DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=16, amax_compute_algo="max")


def gemm_fns(g: Gemm, m: int, te, device: str = "cuda") -> tuple[Callable[[], object], Callable[[], object]]:
    """(bf16, fp8) callables computing y = x @ w.T for one GEMM through the same module type: one `te.Linear`
    (FP8 = that layer under `fp8_autocast`) with TE, else `torch.mm` vs `torch._scaled_mm` (per-tensor scales 1)."""
    x = torch.randn(m, g.k, device=device, dtype=torch.bfloat16)
    if te is not None:
        layer = te.Linear(g.k, g.n, bias=False, params_dtype=torch.bfloat16, device=device)
        recipe = _te_recipe()

        @torch.no_grad()
        def bf16():
            return layer(x)

        @torch.no_grad()
        def fp8():
            with te.fp8_autocast(enabled=True, fp8_recipe=recipe):
                return layer(x)

        return bf16, fp8
    w = torch.randn(g.n, g.k, device=device, dtype=torch.bfloat16)
    x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    return (lambda: torch.mm(x, w.t()),
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))


def bench_gemm(g: Gemm, m: int, te) -> tuple[float, float]:
    """(bf16 seconds, fp8 seconds) for one GEMM."""
    bf16, fp8 = gemm_fns(g, m, te)
    return _time(bf16), _time(fp8)


def gemm_row(tp: int, g: Gemm, m: int, bf16_s: float, fp8_s: float, peak: dict[str, float]) -> dict:
    """One table row as numbers (what `--json` writes)."""
    flops = 2 * m * g.k * g.n
    tb, tf = flops / bf16_s / 1e12, flops / fp8_s / 1e12
    return {"tp": tp, "gemm": g.name, "m": m, "k": g.k, "n": g.n, "bf16_s": bf16_s, "fp8_s": fp8_s,
            "bf16_tflops": tb, "bf16_mfu": tb / peak["bf16"], "fp8_tflops": tf, "fp8_mfu": tf / peak["fp8"],
            "fp8_speedup": bf16_s / fp8_s}


def format_gemm_row(r: dict) -> str:
    return (f"| {r['tp']} | {r['gemm']} | {r['k']} | {r['n']} | {r['bf16_tflops']:.0f} | {r['bf16_mfu']:.0%} | "
            f"{r['fp8_tflops']:.0f} | {r['fp8_mfu']:.0%} | {r['fp8_speedup']:.2f}x |")


def bench_decoder_layer(seq: int, micro_batch: int, fp8: bool) -> float | None:
    """Seconds for forward+backward of one R1V3 decoder layer (megatron-core, TE spec when available)."""
    try:
        from megatron_r1v3.parallel import setup_process

        setup_process()
        from megatron_r1v3.config import RunConfig
        from megatron_r1v3.models.specs import decoder_layer_spec, language_config
        from megatron_r1v3.parallel.layout import ParallelLayout
        from megatron_r1v3.presets import r1v3_38b
    except Exception as exc:
        print(f"decoder layer: skipped (megatron_r1v3 / megatron-core not importable: {exc})", flush=True)
        return None
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
    from megatron.core.transformer.spec_utils import build_module

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29555")
        dist.init_process_group("nccl", rank=0, world_size=1)
        ps.initialize_model_parallel()
        model_parallel_cuda_manual_seed(0)
    cfg = RunConfig(model=r1v3_38b())
    cfg.model.language.num_layers = 1
    cfg.precision.params_dtype = "bf16"
    if fp8:
        cfg.precision.fp8 = "hybrid"
    layer = build_module(decoder_layer_spec(cfg), config=language_config(cfg, ParallelLayout()),
                         layer_number=1).cuda()
    x = torch.randn(seq, micro_batch, 5120, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        out = layer(x, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    if fp8:
        from megatron.core.fp8_utils import get_fp8_context

        def step_fp8():
            with get_fp8_context(layer.config):
                step()

        return _time(step_fp8, iters=10, warmup=3)
    return _time(step, iters=10, warmup=3)


def decoder_layer_flops(seq: int, micro_batch: int) -> float:
    """Forward+backward FLOPs of one decoder layer (3x forward; causal attention counted as half)."""
    t = seq * micro_batch
    gemm = 2 * t * 5120 * (7168 + 5120 + 2 * 27648 + 27648)
    attn = 2 * 2 * micro_batch * seq * seq * 5120 / 2
    return 3 * (gemm + attn)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--layer-seq", type=int, default=4096)
    ap.add_argument("--layer-micro-batch", type=int, default=1)
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    ap.add_argument("--json", default=None, help="also write the measurements as JSON to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("fp8_bench: refusing to run: no CUDA GPU is visible (FP8 GEMMs need an H100/H200-class GPU; on CPU "
              "there is nothing to measure).", file=sys.stderr)
        return 2
    cap = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if cap < (8, 9):
        print(f"fp8_bench: refusing to run: {name} (sm_{cap[0]}{cap[1]}) has no FP8 tensor cores (needs sm_89+).",
              file=sys.stderr)
        return 2
    te = _te()
    peak = PEAKS["H200" if "H200" in name else "H100"]
    backend = ("Transformer Engine " + te.__version__ + " (te.Linear for BF16 and FP8)" if te else
               "torch._scaled_mm (per-tensor scales) vs torch.mm")
    lines: list[str] = []

    def emit(line: str = "") -> None:  # print as measured (a long run shows progress), keep for --markdown
        lines.append(line)
        print(line, flush=True)

    emit(f"device: {name}, torch {torch.__version__}, FP8 via {backend}")
    emit(f"M = {args.tokens} tokens per GEMM; MFU vs dense peaks BF16 {peak['bf16']} / FP8 {peak['fp8']} TFLOP/s")
    emit()
    emit("| TP | GEMM | K | N | BF16 TFLOP/s | BF16 MFU | FP8 TFLOP/s | FP8 MFU | FP8/BF16 |")
    emit("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    result = {"device": name, "torch": torch.__version__, "fp8_backend": backend, "tokens": args.tokens,
              "peak_tflops": peak, "gemms": [], "decoder_layer": []}
    for tp in args.tp:
        for g in r1v3_gemms(tp):
            row = gemm_row(tp, g, args.tokens, *bench_gemm(g, args.tokens, te), peak)
            result["gemms"].append(row)
            emit(format_gemm_row(row))
    flops = decoder_layer_flops(args.layer_seq, args.layer_micro_batch)
    emit()
    rc = 0
    for fp8 in (False, True):
        kind = "FP8" if fp8 else "BF16"
        entry = {"kind": kind, "seq": args.layer_seq, "micro_batch": args.layer_micro_batch}
        result["decoder_layer"].append(entry)
        if fp8 and te is None:
            entry["skipped"] = "needs Transformer Engine"
            emit("decoder layer FP8: needs Transformer Engine (not installed)")
            continue
        try:
            sec = bench_decoder_layer(args.layer_seq, args.layer_micro_batch, fp8)
        except Exception as exc:  # keep the GEMM table (and the files) when the layer fails, e.g. out of memory
            entry["error"] = f"{type(exc).__name__}: {exc}"
            emit(f"decoder layer {kind}: failed ({entry['error']})")
            rc = 1
            continue
        if sec is None:
            entry["skipped"] = "megatron_r1v3 / megatron-core not importable"
            continue
        tflops = flops / sec / 1e12
        entry.update(ms=sec * 1e3, tflops=tflops, mfu_of_bf16_peak=tflops / peak["bf16"])
        emit(f"decoder layer {kind} fwd+bwd (seq {args.layer_seq}, mb {args.layer_micro_batch}): "
             f"{sec * 1e3:.1f} ms, {tflops:.0f} TFLOP/s, MFU {tflops / peak['bf16']:.0%} of BF16 peak")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    return rc


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    sys.exit(rc)
