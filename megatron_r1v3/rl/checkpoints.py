"""`r1v3 eval` and `r1v3 select-checkpoint`: held-out evaluation of megatron_r1v3 checkpoints with vLLM samples.

Both load a checkpoint into the Megatron model at the recipe's layout, push it into the colocated engine (the same
refit as GRPO) and run `rl.evaluate.evaluate_heldout` on `data.val`: avg@k accuracy at `rl.eval_temperature`
with a `rl.max_response_tokens` budget, last-`\\boxed{}` + math-verify + multiple-choice checking, and the
critical-token entropy of the samples teacher-forced through the Megatron model (spec §4). Selection ranks
checkpoints by that entropy (higher = better, the report's rule; `prefer=low` flips it) and reports its Spearman
correlation with accuracy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_r1v3.bridge.convert import check_checkpoint_model
from megatron_r1v3.config import RunConfig
from megatron_r1v3.data.sources import prepare_data
from megatron_r1v3.models.build import build_model
from megatron_r1v3.models.weights import load_initial_weights
from megatron_r1v3.parallel import init_parallel
from megatron_r1v3.rl.evaluate import evaluate_heldout
from megatron_r1v3.rl.prompts import load_prompts
from megatron_r1v3.rl.rollouts import PixelSource
from megatron_r1v3.rl.spmd_rollouts import refit_engines, start_engines


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """A single checkpoint (has `model/`), or every `step_*` checkpoint under a run's checkpoints root."""
    p = Path(path)
    if (p / "model").is_dir():
        return [p]
    found = sorted(d for d in p.glob("step_*") if (d / "model").is_dir() and not d.name.endswith(".partial"))
    if not found:
        raise FileNotFoundError(f"{p}: neither a checkpoint (no model/) nor a directory of step_* checkpoints")
    return found


def evaluate_checkpoints(cfg: RunConfig, paths: list[Path], out_dir: Path) -> list[dict]:
    """Collective: evaluate each checkpoint in turn with the run's engines (`rl.rollout_tp`: SPMD on every rank, or
    one on rank 0); rank 0 writes per-item JSONL per checkpoint."""
    state = init_parallel(cfg)
    sources = prepare_data(cfg, state.rank)
    if not sources.val:
        raise ValueError("evaluation needs held-out data: set data.val (or use the toy task)")
    pixels = PixelSource(cfg, load_prompts(sources.val, sources.root, cfg.data.strict), sources.tokenizer,
                         blank_images=cfg.rl.eval_blank_images)
    chunks = build_model(cfg, init=False)
    worker = start_engines(cfg, sources.tokenizer_dir, sources.tokenizer, out_dir / "vllm_model", chunks)
    results = []
    for path in paths:
        check_checkpoint_model(cfg.model, path)
        load_initial_weights(chunks, str(path))
        refit_engines(worker, chunks, cfg)
        items_dir = out_dir / "items" / path.name if state.rank == 0 else None
        ev = evaluate_heldout(chunks, cfg, worker, pixels, state, 0, items_dir)
        results.append({"checkpoint": str(path), **ev})
    if worker is not None:
        worker.close()
    return results


def spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    if len(xs) < 2:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy) if vx > 0 and vy > 0 else float("nan")


def rank_checkpoints(results: list[dict], key: str = "critical_entropy", prefer: str = "high") -> dict:
    """Ranking by `key` (NaN last), the pick, and the Spearman correlation of `key` with accuracy."""
    if prefer not in ("high", "low"):
        raise ValueError(f"prefer must be high or low, got {prefer!r}")
    sign = -1.0 if prefer == "high" else 1.0
    usable = [r for r in results if not math.isnan(r[key])]
    ranked = sorted(usable, key=lambda r: sign * r[key]) + [r for r in results if math.isnan(r[key])]
    return {"key": key, "prefer": prefer, "ranking": ranked, "best": ranked[0]["checkpoint"] if usable else None,
            "spearman_vs_accuracy": spearman([r[key] for r in usable], [r["accuracy"] for r in usable])}


def table(results: list[dict], key: str = "critical_entropy") -> str:
    """A fixed-width table of the evaluation results."""
    lines = [f"{'checkpoint':<48} {'accuracy':>9} {'pass@k':>7} {'format':>7} {key:>17} {'length':>7}"]
    for r in results:
        name = str(r["checkpoint"])[-48:]
        lines.append(f"{name:<48} {r['accuracy']:>9.3f} {r['pass_at_k']:>7.3f} {r['format']:>7.3f} "
                     f"{r[key]:>17.4f} {r['response_length']:>7.1f}")
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=float))
