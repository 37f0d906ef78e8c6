#!/usr/bin/env python
"""Conversion speed and memory, measured in one run on this machine.

Writes a random HF checkpoint of a deep, narrow R1V3-shaped model (default ≈1.2 GB fp32, 500 MB shards), then times
the same bytes read and written once (`safetensors.load_file` + `torch.save` of every shard) against the conversion,
each on the same footing:
  cold      = a fresh process each: `python -c <load_file + torch.save>` vs the `r1v3 convert hf-to-megatron --tp 2
              --pp 2` command (interpreter start and imports included on both sides);
  in-process = both called in this process (imports done): the baseline loop vs `bridge.convert.hf_to_megatron`.
Every run starts after `os.sync()` (no earlier write-back in flight); each side runs `--repeats` times, interleaved,
and the best run counts. The conversion fsyncs its output (as megatron-core's writer does); the baseline does not.
memory = peak RSS of the conversion process / size of the largest shard.
Targets (issue 3): time ratio <= 1.5, memory ratio <= 3.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file


def bench_model(layers: int):
    from megatron_r1v3.presets import tiny

    m = tiny()  # decoder 40 x 768, ViT 12 x 256, vocab 32000
    m.vision.hidden_size, m.vision.num_heads, m.vision.num_layers, m.vision.ffn_hidden_size = 256, 4, 12, 1024
    m.vision.image_size, m.vision.patch_size = 112, 14
    lm = m.language
    lm.num_layers, lm.hidden_size, lm.ffn_hidden_size, lm.num_heads, lm.num_kv_heads = layers, 768, 2048, 12, 4
    lm.vocab_size = 32_000
    return m


class PeakRSS:
    """Polls the RSS of a process tree; `peak_single` = largest single process, `peak_sum` = largest total."""

    def __init__(self, pid: int):
        self.root, self.peak_single, self.peak_sum, self._stop = psutil.Process(pid), 0, 0, False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                rss = [p.memory_info().rss for p in procs if p.is_running()]
                self.peak_single, self.peak_sum = max(self.peak_single, max(rss)), max(self.peak_sum, sum(rss))
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self):
        self._stop = True
        self._thread.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from megatron_r1v3.bridge.random_hf import write_random_hf_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-conv-"))
    hf = work / "hf"
    if not hf.exists():
        write_random_hf_checkpoint(hf, bench_model(args.layers), "native", max_shard_bytes=args.shard_mb * 2**20)
    shards = sorted(hf.glob("*.safetensors"))
    total, largest = sum(s.stat().st_size for s in shards), max(s.stat().st_size for s in shards)
    print(f"checkpoint: {len(shards)} shards, {total / 2**30:.2f} GiB, largest {largest / 2**20:.0f} MiB")

    out = work / "megatron"
    base_code = ("import sys, torch; from safetensors.torch import load_file\n"
                 "for s in sys.argv[2:]: torch.save(load_file(s), sys.argv[1])")
    convert_cmd = [sys.executable, "-m", "megatron_r1v3.cli", "convert", "hf-to-megatron", "--hf", str(hf),
                   "--out", str(out), "--tp", str(args.tp), "--pp", str(args.pp)]

    def base_inproc() -> float:
        t0 = time.perf_counter()
        for s in shards:
            torch.save(load_file(str(s)), work / "baseline.pt")
        return time.perf_counter() - t0

    def base_cold() -> float:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", base_code, str(work / "baseline.pt"), *map(str, shards)], check=True)
        return time.perf_counter() - t0

    def ours_inproc() -> float:
        from megatron_r1v3.bridge.convert import hf_to_megatron

        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        hf_to_megatron(str(hf), str(out), args.tp, args.pp, progress=False)
        return time.perf_counter() - t0

    peaks = []

    def ours_cold() -> float:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(convert_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rss = PeakRSS(proc.pid)
        _, stderr = proc.communicate()
        took = time.perf_counter() - t0
        rss.stop()
        if proc.returncode:
            raise SystemExit(stderr[-3000:])
        peaks.append(rss.peak_single)
        return took

    runs = {f: [] for f in (base_inproc, ours_inproc, base_cold, ours_cold)}
    for _ in range(args.repeats):
        for fn, times in runs.items():
            os.sync()
            times.append(fn())
    best = {fn.__name__: min(times) for fn, times in runs.items()}
    for fn, times in runs.items():
        print(f"{fn.__name__:12s} best {min(times):.2f}s  runs " + ", ".join(f"{t:.2f}" for t in times))
    print(f"(ours = hf-to-megatron to TP{args.tp}·PP{args.pp}, one process)")
    print(f"peak RSS of the conversion process: {max(peaks) / 2**20:.0f} MiB")
    print(f"time_ratio_cold={best['ours_cold'] / best['base_cold']:.2f} (fresh process each side; target <= 1.5)")
    print(f"time_ratio_inprocess={best['ours_inproc'] / best['base_inproc']:.2f} (imports done; target <= 1.5)")
    print(f"memory_ratio={max(peaks) / largest:.2f} (peak RSS / largest shard; target <= 3)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
