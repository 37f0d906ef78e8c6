"""The 38B recipes (`examples/r1v3_38b_*.yaml`) at their own layout, scaled down to what a 2-core box holds, and
the ranks' side of their runs (tests/test_recipes_38b.py: SFT recipes; tests/rollout/recipe_grpo_38b.py: GRPO).

`scaled_overrides` changes only what the box cannot hold — model preset -> tiny, TP -> at most 2 (trainer and
rollout engines), FP8 -> off (it needs Transformer Engine), data -> the embedded toy task, steps -> 2, sequence
length, global batch (4 microbatches), validation (once, at step 2) and GRPO's prompts/samples/lengths -> small,
stage 0's decoder layers -> the recipe's share of the tiny decoder, the periodic save -> every step (the recipe's
cadence would never fire in 2 steps), no initial checkpoint (GRPO: a tiny cold-start SFT one) — and keeps
everything else: PP, VPP, sequence parallel, recompute, the distributed optimizer and its overlap flag, bf16, the
trainable set, optimizer and schedule, keep_last, GRPO's loss, advantage and buffer settings. DP stays 1 (TP·PP
ranks): the recipes' minimal layout (TP8·PP2 on 2 nodes) has DP=1 too. A recipe without a `train` section (the
layout recipe `r1v3_38b_parallel.yaml`, made for `r1v3 train-step`) trains as SFT with its `demo` batch shape.

Each recipe runs 2 steps uninterrupted (checkpoints at steps 1 and 2), then from a copy of the step-1 checkpoint
alone, in the same launch. The resumed run's step 2 must equal the uninterrupted one
bit for bit: its logged metrics, every model parameter and the optimizer's fp32 main parameters and Adam moments
on every rank.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_DECODER_LAYERS = 4
MICROBATCHES = 4  # per step: past the pipeline's warm-up at PP2
SEQ_LENGTH = 192  # the toy task's samples fit (tiny_cpu_sft.yaml)
RESPONSE_TOKENS = 64  # GRPO's first response budget (the toy traces fit); the schedule's later ones scale with it
TIMINGS = {"tokens_per_s", "images_per_s", "time/", "refit/seconds", "refit/gb_per_s", "rollout/gen_tokens_per_s"}


def recipes() -> list[Path]:
    """Every 38B recipe in examples/ (globbed: a new one is picked up without editing the tests)."""
    return sorted((ROOT / "examples").glob("r1v3_38b_*.yaml"))


def is_grpo(recipe: Path) -> bool:
    """A recipe with an `rl` section is a GRPO recipe (`r1v3 rl`); the others train with `r1v3 sft`."""
    from omegaconf import OmegaConf

    return "rl" in OmegaConf.load(str(recipe))


def world_size(recipe: Path) -> int:
    """Ranks of the scaled-down layout: TP (at most 2) x PP x CP, DP = 1."""
    from megatron_r1v3.presets import load_config

    p = load_config(recipe).parallel
    return min(p.tensor, 2) * p.pipeline * p.context


def scaled_overrides(recipe: Path, workdir: str | Path, output_dir: str | Path) -> list[str]:
    """`key=value` overrides that fit `recipe` on a 2-core CPU box; everything not named here stays the recipe's."""
    from omegaconf import OmegaConf

    from megatron_r1v3.presets import load_config

    raw = OmegaConf.load(str(recipe))
    cfg = load_config(recipe)
    p, t = cfg.parallel, cfg.train
    out = [
        "model.preset=tiny", f"parallel.tensor={min(p.tensor, 2)}", "precision.fp8=null",
        "data.train=[]", "data.val=[]", "data.tokenizer=null", f"data.toy_dir={Path(workdir) / 'toy'}",
        "data.toy_train=32", "data.toy_val=8", "data.decode_threads=1", f"data.seq_length={SEQ_LENGTH}",
        "train.steps=2", "checkpoint.load=null", "checkpoint.save_every=1", f"output_dir={output_dir}",
        "logging.tensorboard=false", "logging.progress=false",
    ]
    if p.decoder_layers_in_first_stage is not None:  # the recipe's share of the decoder, rounded down (>= 1)
        share = p.decoder_layers_in_first_stage / cfg.model.language.num_layers
        out.append(f"parallel.decoder_layers_in_first_stage={max(1, math.floor(share * TINY_DECODER_LAYERS))}")
    micro = cfg.demo.num_microbatches if "train" not in raw and "demo" in raw else MICROBATCHES
    mbs = cfg.demo.micro_batch_size if "train" not in raw and "demo" in raw else t.micro_batch_size
    out += [f"train.micro_batch_size={mbs}", f"train.global_batch_size={mbs * min(micro, MICROBATCHES)}"]
    if t.eval_every:  # validation runs once, at the last step
        out += ["train.eval_every=2", "train.eval_batches=2"]
    if "rl" in raw:
        out += _rl_overrides(cfg)
    return out


def _rl_overrides(cfg) -> list[str]:
    """GRPO: 2 prompts x 4 samples, short responses and prompts, a small held-out set; the length schedule keeps its
    switch step with a proportionally longer budget; the KV cache fits the CPU engine; one scoring process; engines
    of TP2 where the recipe's span 8 GPUs (like the trainer's TP8 -> TP2)."""
    r = cfg.rl
    grow = [[int(step), max(1, int(tokens) * RESPONSE_TOKENS // r.max_response_tokens)]
            for step, tokens in r.length_schedule]
    return ["rl.prompts_per_step=2", "rl.samples_per_prompt=4", f"rl.max_response_tokens={RESPONSE_TOKENS}",
            f"rl.length_schedule={json.dumps(grow)}", "rl.max_prompt_tokens=256", "rl.eval_prompts=4",
            "rl.eval_samples=2", "rl.kv_cache_mb=64"] + (
                ["rl.reward_workers=1"] if getattr(r, "reward_workers", 0) > 1 else []) + (  # scoring: 2 cores
                [f"rl.rollout_tp={min(r.rollout_tp, 2)}"] if getattr(r, "rollout_tp", 0) > 2 else [])  # as TP8 -> 2


def snapshot(chunks, optimizer) -> dict:
    """This rank's model parameters by name and the optimizer's fp32 main parameters and state, in order."""
    params = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks) for n, p in c.named_parameters()}
    main = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in (inner.param_groups if inner is not None else []):
            for p in group["params"]:
                state = inner.state.get(p, {})
                main.append({"param": p.detach().clone(),
                             **{k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}})
    return {"params": params, "main": main}


def differences(a: dict, b: dict) -> list[str]:
    """Names of everything that differs between two snapshots (empty = bit-exact)."""
    diff = [n for n in a["params"] if n not in b["params"] or not torch.equal(a["params"][n], b["params"][n])]
    if len(a["main"]) != len(b["main"]):
        return diff + [f"optimizer holds {len(a['main'])} vs {len(b['main'])} main parameters"]
    for i, (x, y) in enumerate(zip(a["main"], b["main"])):
        diff += [f"main[{i}].{k}" for k in x if k not in y or not torch.equal(x[k], y[k])]
    return diff


def metric_rows(out: Path) -> dict[str, dict[int, dict]]:
    """group -> step -> logged values (no timings) from `metrics.jsonl`; a step logged twice keeps its last."""
    groups: dict[str, dict[int, dict]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        groups.setdefault(r["group"], {})[r["step"]] = {
            k: v for k, v in r.items() if not any(k.startswith(s) for s in TIMINGS)}
    return groups


def copy_first_checkpoint(full: Path, resumed: Path) -> None:
    """Rank 0: a fresh run directory holding only the uninterrupted run's step-1 checkpoint as `latest`."""
    shutil.rmtree(resumed, ignore_errors=True)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000001", resumed / "checkpoints" / "step_00000001")
    (resumed / "checkpoints" / "latest").write_text("step_00000001\n")


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _dirs(workdir: str, recipe: str, label: str) -> tuple[Path, Path]:
    base = Path(workdir) / (label or Path(recipe).stem)
    return base / "full", base / "resumed"


def run_full(recipe: str, workdir: str, loop, extra: list[str] = (), label: str = "") -> dict:
    """`loop(cfg)` for the recipe (+ `extra` overrides) 2 steps uninterrupted; this rank's final state goes to a
    file for `run_resumed`, rank 0 prepares the resumed run's directory holding the step-1 checkpoint."""
    import torch.distributed as dist

    from megatron_r1v3.presets import load_config

    full, resumed = _dirs(workdir, recipe, label)
    t0, cpu0 = time.monotonic(), _cpu_seconds()
    first = loop(load_config(Path(recipe), [*scaled_overrides(Path(recipe), workdir, full), *extra]))
    reference = snapshot(first["chunks"], first["optimizer"])
    torch.save(reference, full / f"reference_rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        copy_first_checkpoint(full, resumed)
    dist.barrier()
    before = first["before"]
    return {"params": sorted(before), "main_params": len(reference["main"]),
            "changed": [n for n in before if not torch.equal(before[n], reference["params"][n])],
            "seconds_full": time.monotonic() - t0, "cpu_seconds_full": _cpu_seconds() - cpu0}


def run_resumed(recipe: str, workdir: str, loop, extra: list[str] = (), label: str = "") -> dict:
    """The same run resumed from its step-1 checkpoint: what differs from the uninterrupted run's final state (this
    rank's), and (rank 0) both runs' logged metrics."""
    import torch.distributed as dist

    from megatron_r1v3.presets import load_config

    full, resumed = _dirs(workdir, recipe, label)
    t0, cpu0 = time.monotonic(), _cpu_seconds()
    second = loop(load_config(Path(recipe), [*scaled_overrides(Path(recipe), workdir, resumed), *extra]))
    reference = torch.load(full / f"reference_rank{dist.get_rank()}.pt")
    out = {"recipe": label or Path(recipe).stem, "rank": dist.get_rank(), "resumed_from": second["start"],
           "differences": differences(reference, snapshot(second["chunks"], second["optimizer"])),
           "seconds_resumed": time.monotonic() - t0, "cpu_seconds_resumed": _cpu_seconds() - cpu0}
    if dist.get_rank() == 0:
        out["metrics_full"], out["metrics_resumed"] = metric_rows(full), metric_rows(resumed)
        out["checkpoints"] = sorted(p.name for p in (full / "checkpoints").iterdir())
        out["layout"] = json.loads((full / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())[
            "layout"]
    return out


def _capture(loop, cfg) -> dict:
    """Run `loop(cfg)` (run_sft or run_grpo), keeping its run's optimizer, initial weights and first step."""
    from megatron_r1v3.training import run as run_module

    seen = {}
    original = run_module.TrainingRun.resume

    def resume(self, **stateful):
        seen["before"] = {f"{i}.{n}": p.detach().clone() for i, c in enumerate(self.chunks)
                          for n, p in c.named_parameters()}
        seen["optimizer"] = self.optimizer
        seen["start"] = original(self, **stateful)
        return seen["start"]

    run_module.TrainingRun.resume = resume
    try:
        result = loop(cfg)
    finally:
        run_module.TrainingRun.resume = original
    return {**result, **seen}


def _sft_loop(cfg) -> dict:
    from megatron_r1v3.sft.trainer import run_sft

    return _capture(run_sft, cfg)


def _grpo_loop(cfg) -> dict:
    from megatron_r1v3.rl.grpo import run_grpo

    return _capture(run_grpo, cfg)


def sft_recipes(workdir: str, cases: list[tuple[str, list[str], str]]) -> list[dict]:
    """Each (recipe, extra overrides, label) SFT case in turn in this one launch, uninterrupted then resumed
    (megatron's groups rebuilt per run)."""
    return [run_full(r, workdir, _sft_loop, extra, label) | run_resumed(r, workdir, _sft_loop, extra, label)
            for r, extra, label in cases]


def grpo_recipes(workdir: str, cases: list[tuple[str, list[str], str]], start: str) -> list[dict]:
    """Each GRPO case from the cold-start SFT checkpoint `start` (as the recipes start from one; a random policy
    never earns a reward, so its gradients would all be zero), uninterrupted then resumed, in this one launch: the
    resumed run starts its engines in a process whose first engines have shut down (`rollout.dist_registry`)."""
    return [run_full(r, workdir, _grpo_loop, [*extra, f"checkpoint.load={start}"], label)
            | run_resumed(r, workdir, _grpo_loop, [*extra, f"checkpoint.load={start}"], label)
            for r, extra, label in cases]
