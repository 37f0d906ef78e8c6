"""Benchmark: DALI vs Pillow decode + InternVL tiling + normalise on the same JPEGs, measured in one run.

Generates N JPEGs of mixed sizes (synthetic scenes drawn with numpy/Pillow, no downloads), warms every decoder
up, then times each on the whole set and prints images/s and the DALI/Pillow ratios.

    python tools/bench_images.py --images 256 --tile 448 --max-tiles 6
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageDraw

from megatron_r1v3.data.dali import DaliImageDecoder
from megatron_r1v3.data.decode_pillow import ImageDecodeError, PillowImageDecoder, decode_rgb
from megatron_r1v3.data.tiling import TilingConfig, num_tiles


def scene(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photo-like test image: smooth colour gradients, a few shapes, mild sensor noise."""
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    phase = rng.uniform(0, 6, size=3)
    base = np.stack([128 + 100 * np.sin(4 * x + 3 * y + p) for p in phase], axis=-1)
    base += rng.normal(0, 6, size=base.shape).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, max(11, min(width, height) // 4)))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
    return img


def make_jpegs(count: int, seed: int, low: int = 448, high: int = 1000) -> list[bytes]:
    """count JPEGs (quality 90) with each side drawn uniformly from [low, high] px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(low, high + 1, size=2))
        buf = io.BytesIO()
        scene(width, height, rng).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def check(results: list) -> int:
    """Fail loudly on decode errors; return the tile count (decode only: the image count)."""
    for r in results:
        if isinstance(r, ImageDecodeError):
            raise r
    return sum(int(r.shape[0]) if r.ndim == 4 else 1 for r in results)


def timed(
    runs: dict[str, Callable[[list[bytes]], list]], jpegs: list[bytes], batch: int, repeats: int, expected: int
) -> dict[str, float]:
    """Best wall time per path over `repeats` interleaved rounds (so background load hits every path alike).

    Each path consumes the images in batches and drops each batch's tiles, as a training loop would.
    """
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            tiles = sum(check(run(jpegs[i : i + batch])) for i in range(0, len(jpegs), batch))
            best[name] = min(best[name], time.perf_counter() - start)
            if tiles != expected:
                raise SystemExit(f"{name}: {tiles} tiles, expected {expected}")
    return best


def main() -> None:
    """Run the benchmark and print the table and the ratio line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--tile", type=int, default=448)
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = TilingConfig(tile_size=args.tile, max_tiles=args.max_tiles)
    jpegs = make_jpegs(args.images, args.seed)
    sizes = [Image.open(io.BytesIO(b)).size for b in jpegs]
    expected = sum(num_tiles(w, h, cfg) for w, h in sizes)
    mb = sum(len(b) for b in jpegs) / 2**20

    pillow1 = PillowImageDecoder(cfg, num_threads=1)
    pillow_n = PillowImageDecoder(cfg, num_threads=args.threads)
    dali = DaliImageDecoder(cfg, batch_size=args.batch_size, num_threads=args.threads, device="cpu")
    runs = {
        "pillow, 1 thread": pillow1.decode_and_tile,
        f"pillow, {args.threads} threads": pillow_n.decode_and_tile,
        f"dali cpu, {args.threads} threads": dali.decode_and_tile,
    }
    decode_pool = ThreadPoolExecutor(args.threads)
    decode_runs = {
        "pillow, 1 thread": lambda items: [decode_rgb(b) for b in items],
        f"pillow, {args.threads} threads": lambda items: list(decode_pool.map(decode_rgb, items)),
        f"dali cpu, {args.threads} threads": dali.decode,
    }
    for run in [*runs.values(), *decode_runs.values()]:  # warm-up: thread pools, DALI pipelines, allocator
        check(run(jpegs[: 2 * args.batch_size]))

    sides = [side for size in sizes for side in size]
    print(
        f"{args.images} JPEGs, sides {min(sides)}..{max(sides)} px, {mb:.1f} MiB; tile {args.tile}, "
        f"max_tiles {args.max_tiles}, {expected} tiles incl. thumbnails"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"GPU: {'yes' if torch.cuda.is_available() else 'none'}"
    )
    load_before = os.getloadavg()[0]
    best = timed(runs, jpegs, args.batch_size, args.repeats, expected)
    best_decode = timed(decode_runs, jpegs, args.batch_size, args.repeats, args.images)
    print(f"{'path':<22} {'seconds':>8} {'images/s':>9} {'tiles/s':>8}   decode only: {'images/s':>8}")
    rates, decode_rates = {}, {}
    for name, seconds in best.items():
        rates[name] = args.images / seconds
        decode_rates[name] = args.images / best_decode[name]
        print(
            f"{name:<22} {seconds:>8.2f} {rates[name]:>9.1f} {expected / seconds:>8.1f}   "
            f"{'':>13}{decode_rates[name]:>8.1f}"
        )
    names = list(rates)
    for label, table in (("decode+tile+normalise", rates), ("decode only", decode_rates)):
        print(
            f"ratio {label}: dali/pillow-1-thread = {table[names[2]] / table[names[0]]:.2f}x, "
            f"dali/pillow-{args.threads}-threads = {table[names[2]] / table[names[1]]:.2f}x"
        )
    print(
        f"best of {args.repeats} interleaved rounds; 1-min load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    pillow_n.close()
    decode_pool.shutdown()


if __name__ == "__main__":
    main()
