#!/usr/bin/env python
"""Conversion speed and memory, measured in one run on this machine.

Writes a random HF checkpoint of a deep, narrow R1V3-shaped model (default ≈1.3 GB fp32, 500 MB shards), then:
  baseline  = time to `safetensors.load_file` + `torch.save` every shard (the same bytes, read and written once);
  ours      = wall time of `r1v3 convert hf-to-megatron --tp 2 --pp 2` (4 processes, process start included);
  memory    = peak RSS of the largest conversion process / size of the largest shard.
Targets (issue 3): time ratio <= 1.5, memory ratio <= 3.
"""

from __future__ import annotations

import argparse
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
    from megatron_r1v3.models.presets import tiny

    m = tiny()
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

    def baseline() -> float:
        t0 = time.perf_counter()
        for s in shards:
            torch.save(load_file(str(s)), work / "baseline.pt")
        return time.perf_counter() - t0

    base_before = baseline()
    out = work / "megatron"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_r1v3.cli", "convert", "hf-to-megatron", "--hf", str(hf), "--out", str(out),
           "--tp", str(args.tp), "--pp", str(args.pp)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = PeakRSS(proc.pid)
    stdout, stderr = proc.communicate()
    ours = time.perf_counter() - t0
    rss.stop()
    if proc.returncode:
        print(stderr[-3000:], file=sys.stderr)
        return 1
    base_after = baseline()  # measured on both sides of the conversion: page-cache state is the same
    base = min(base_before, base_after)
    print(f"baseline load_file+torch.save: {base:.2f}s (runs: {base_before:.2f}s, {base_after:.2f}s)")
    print(f"hf-to-megatron TP{args.tp}·PP{args.pp} ({args.tp * args.pp} processes): {ours:.2f}s")
    print(f"peak RSS: largest process {rss.peak_single / 2**20:.0f} MiB, all processes {rss.peak_sum / 2**20:.0f} MiB")
    print(f"time_ratio={ours / base:.2f} (target <= 1.5)")
    print(f"memory_ratio={rss.peak_single / largest:.2f} (peak RSS of one process / largest shard; target <= 3)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
