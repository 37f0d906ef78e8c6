"""`r1v3` command line: `info`, `train-step`, `sft`, `rl`, `eval`, `select-checkpoint`, `convert hf-to-megatron|
megatron-to-hf` and `compare-hf`.

A command that needs N processes and is not already under torchrun/srun re-executes itself under torchrun
(`--nproc`, default: the processes the config's layout needs), so a user types one command. Each command sets its
process up (`parallel.setup_process`: the CPU shim for megatron-core, warning filters) after deciding whether to
re-execute, so the launching process never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from typing import Optional

from megatron_r1v3.config import ConfigError, RunConfig, prompt_token_budget
from megatron_r1v3.parallel import setup_process
from megatron_r1v3.parallel.layout import ParallelLayout
from megatron_r1v3.parallel.lifeline import LAUNCHER_PID
from megatron_r1v3.presets import load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="recipe YAML (examples/*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. parallel.tensor=2")
    p.add_argument("--nproc", type=int, default=None, help="processes to launch when not under torchrun/srun")


def _load(args) -> RunConfig:
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    return load_config(config, overrides)


def _is_rank0() -> bool:
    """Rank 0 of the job under torchrun or srun (or a single process)."""
    from megatron_r1v3.parallel.env import detect_launch_env

    return detect_launch_env().rank == 0


def processes_needed(cfg: RunConfig) -> int:
    return ParallelLayout.processes_needed(cfg.parallel)


def maybe_relaunch(nproc: int, argv: list[str]) -> None:
    """Re-exec this command under torchrun with `nproc` processes unless already under a launcher."""
    from megatron_r1v3.parallel.env import under_launcher

    if nproc <= 1 or under_launcher() is not None:
        return
    # the ranks need no --nproc, and torchrun's parser takes it for an abbreviation of its own --nproc-per-node
    ranks_argv = [a for i, a in enumerate(argv) if not (a == "--nproc" or a.startswith("--nproc=")
                                                        or (i and argv[i - 1] == "--nproc"))]
    cmd = [sys.executable, "-m", "megatron_r1v3.parallel.torchrun", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "megatron_r1v3.cli", *ranks_argv]  # torchrun, minus its traceback when a rank failed
    print(f"[r1v3] launching {nproc} processes: torchrun --standalone --nproc-per-node={nproc} ...", flush=True)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[LAUNCHER_PID] = str(os.getpid())  # torchrun keeps this pid: the ranks end with it (lifeline.py)
    os.execv(sys.executable, cmd)


def _relaunched(nproc: int, argv: list[str]) -> None:
    """`maybe_relaunch`, then (in the process that goes on) `setup_process`. Every command sets its process up
    itself, this way or with `setup_process()` at its start: one that re-executes itself under torchrun must not
    import torch first (1.3 s per launch on 2 cores, before torchrun imports it again)."""
    maybe_relaunch(nproc, argv)
    setup_process()


def cmd_info(args) -> int:
    """Parameter counts of a preset, built on the meta device at TP1·PP1 (no memory, no GPU)."""
    setup_process()
    overrides = [f"model.preset={args.preset}", "parallel.launcher=none", *args.overrides]
    cfg = load_config(None, overrides)
    from megatron_r1v3.models.build import build_model, count_parameters
    from megatron_r1v3.models.internvit import padding_parameter_count
    from megatron_r1v3.parallel import destroy_parallel, init_parallel

    init_parallel(cfg)
    counts = count_parameters(build_model(cfg, meta=True))
    destroy_parallel()
    pad = padding_parameter_count(cfg.model.vision)
    real = {
        "vision (InternViT)": counts["vision_model"] - pad,
        "connector (mlp1)": counts["mlp1"],
        "decoder (Qwen2.5)": counts["language_model"],
    }
    m, v, lm = cfg.model, cfg.model.vision, cfg.model.language
    print(f"preset {m.preset}: ViT {v.num_layers}L h{v.hidden_size} {v.num_heads} heads"
          f" (padded to {v.padded_heads}), decoder {lm.num_layers}L h{lm.hidden_size}"
          f" {lm.num_heads}q/{lm.num_kv_heads}kv heads, vocab {lm.vocab_size}, {m.tokens_per_tile} tokens/tile")
    for name, n in real.items():
        print(f"{name:<22} {n:>16,d}  ({n / 1e9:.3f}B)")
    total = sum(real.values())
    print(f"{'total':<22} {total:>16,d}  ({total / 1e9:.3f}B)")
    print(f"{'zero ViT padding heads':<22} {pad:>16,d}  (allocated, not counted)")
    return 0


def cmd_train_step(args) -> int:
    """A few real training steps of the model on random VLM batches at the configured TP/PP/VPP/DP layout."""
    cfg = _load(args)
    _relaunched(args.nproc or processes_needed(cfg), sys.argv[1:])
    from megatron_r1v3.models.build import build_model, count_parameters
    from megatron_r1v3.parallel import destroy_parallel, init_parallel
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.random_batch import random_microbatches
    from megatron_r1v3.training.step import train_step

    state = init_parallel(cfg)
    chunks = build_model(cfg)
    ddp = wrap_ddp(chunks, cfg)
    opt = build_optimizer(ddp, cfg)
    d = cfg.demo
    say = print if state.rank == 0 else (lambda *a, **k: None)
    say(f"[r1v3] layout {state.layout.label()} on {state.backend}/{state.device.type}; rank 0 holds "
        + ", ".join(f"{k}={v:,}" for k, v in sorted(count_parameters(chunks).items())) + " parameters")
    for step in range(d.steps):
        batches = random_microbatches(
            cfg.model, d.num_microbatches * state.dp, d.micro_batch_size, d.seq_length, d.tiles_per_sample,
            seed=cfg.seed + step,
        )[state.dp_rank :: state.dp]
        t0 = time.perf_counter()
        metrics = train_step(ddp, opt, batches)
        say(f"step {step + 1}/{d.steps}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}"
            f"  {time.perf_counter() - t0:.2f}s")
    destroy_parallel()
    return 0


def _size(text: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    for unit, mult in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def cmd_convert(args) -> int:
    """HF -> Megatron: one process for any target TP/PP. Megatron -> HF: tp*pp processes (re-launched under
    torchrun when needed), a servable directory unless --weights-only."""
    if args.direction == "megatron-to-hf":
        _relaunched(args.tp * args.pp, sys.argv[1:])
    else:
        setup_process()
        if not _is_rank0():
            return 0  # launched on several ranks (srun/torchrun): rank 0 converts alone
    from megatron_r1v3.bridge.convert import ConversionError, hf_to_megatron
    from megatron_r1v3.bridge.hf_io import HFFormatError
    from megatron_r1v3.bridge.mapping import MappingError
    from megatron_r1v3.data.tokenizer import TokenizerError
    from megatron_r1v3.rollout.hf_export import ServableError

    t0 = time.perf_counter()
    try:
        if args.direction == "hf-to-megatron":
            out = hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vpp)
        else:
            out = _export_hf(args)
    except (ConversionError, MappingError, HFFormatError, FileNotFoundError, ServableError, TokenizerError,
            ConfigError) as exc:
        print(f"r1v3 convert: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.direction == "megatron-to-hf":
            from megatron_r1v3.parallel import destroy_parallel

            destroy_parallel()
    if _is_rank0():
        print(f"[r1v3] {args.direction}: {out['tensors']} tensors -> {args.out} in {time.perf_counter() - t0:.1f}s")
        if "seconds" in out:
            print("[r1v3] phases: " + ", ".join(f"{k} {v:.2f}s" for k, v in out["seconds"].items()))
        if "serving" in out:
            print(f"[r1v3] servable: {out['serving']}")
    return 0


def _serving_settings(args, model):
    """(ServingSettings, where from): --config (a recipe or a run's config.yaml), else the run's config.yaml above
    a `<run>/checkpoints/step_N` directory; the recipe's model must be the checkpoint's."""
    from pathlib import Path

    from megatron_r1v3.bridge.convert import check_checkpoint_model
    from megatron_r1v3.rollout.hf_export import ServingSettings

    ckpt = Path(args.megatron)
    found = [p for p in (ckpt / "config.yaml", ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml")
             if p.is_file()]
    path = Path(args.config) if args.config else (found[0] if found else None)
    if path is None:
        return ServingSettings(), "defaults (no --config and no run config.yaml above the checkpoint)"
    if not path.is_file():
        raise ConfigError(f"--config {path} does not exist")
    cfg = load_config(path)
    check_checkpoint_model(cfg.model, ckpt)
    return ServingSettings.from_run(cfg), str(path)


def _export_hf(args) -> dict:
    """Collective megatron -> HF into a hidden staging directory; rank 0 then adds the serving files (tokenizer,
    processor, chat template, generation config: `rollout.hf_export`, the rollout engine's own writer) and renames
    it to --out. What would make the directory unservable is checked first; nothing is left at --out on failure."""
    import json
    import shutil
    from pathlib import Path

    from megatron_r1v3.bridge.convert import ConversionError, megatron_to_hf, read_meta
    from megatron_r1v3.rollout.hf_export import check_servable, write_serving_files

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConversionError(f"output {out} already exists and is not empty; refusing to overwrite")
    if args.weights_only:
        return megatron_to_hf(args.megatron, args.out, args.layout, args.tp, args.pp, _size(args.max_shard_size))
    meta = read_meta(args.megatron)
    layout = args.layout or meta.get("source_layout") or "native"
    serving, source = _serving_settings(args, meta["model"])
    assets = Path(args.megatron) / "hf_assets"
    original = assets / "config.json"
    source_config = json.loads(original.read_text()) if layout == meta.get("source_layout") and original.is_file() \
        else {}
    check_servable(meta["model"], args.tokenizer or assets, layout, assets, source_config)  # before converting
    staging = out.parent / f".{out.name}.export"
    if _is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
    result = megatron_to_hf(args.megatron, str(staging), layout, args.tp, args.pp, _size(args.max_shard_size))
    if not _is_rank0():
        return result
    try:
        tokenizer = Path(args.tokenizer) if args.tokenizer else staging
        written = write_serving_files(staging, meta["model"], tokenizer, serving, layout)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result["serving"] = (f"{', '.join(written)}; tiling and sampling from {source} (max_tiles {serving.max_tiles},"
                         f" temperature {serving.temperature}, top_p {serving.top_p})")
    return result


def cmd_compare_hf(args) -> int:
    """Run transformers and Megatron on the same input; the last line is `max_abs_logit_diff=<float>`."""
    _relaunched(args.tp * args.pp, sys.argv[1:])
    from megatron_r1v3.compare_hf import compare_hf
    from megatron_r1v3.parallel import destroy_parallel

    diff = compare_hf(args.hf, args.megatron, args.tp, args.pp, args.image, args.prompt)
    destroy_parallel()
    if _is_rank0():
        print(f"max_abs_logit_diff={diff:.6g}")
    return 0


def _run_loop(command: str, loop, cfg: RunConfig):
    """`loop(cfg)`'s result, or the exit code of a run that ends without one: 0 when it is complete already (a
    requeued or re-submitted job), 1 for a checkpoint it cannot use (the same error on every rank; rank 0 prints
    it)."""
    from megatron_r1v3.models.weights import CheckpointError
    from megatron_r1v3.parallel import destroy_parallel
    from megatron_r1v3.training.run import RunAlreadyComplete

    try:
        return loop(cfg)
    except RunAlreadyComplete as done:
        code, line, stream = 0, f"[{command}] {done}", sys.stdout
    except CheckpointError as exc:
        code, line, stream = 1, f"r1v3 {command}: error: {exc}", sys.stderr
    if _is_rank0():
        print(line, file=stream, flush=True)
    destroy_parallel()
    return code


def cmd_sft(args) -> int:
    """Cold-start SFT or connector-only tuning (`train.trainable`) from a recipe."""
    cfg = _load(args)
    _relaunched(args.nproc or processes_needed(cfg), sys.argv[1:])
    from megatron_r1v3.data.records import RecordError
    from megatron_r1v3.data.sft_dataset import BadSampleError
    from megatron_r1v3.data.tokenizer import TokenizerError
    from megatron_r1v3.parallel import destroy_parallel
    from megatron_r1v3.sft.trainer import run_sft

    try:
        result = _run_loop("sft", run_sft, cfg)
    except (RecordError, BadSampleError, TokenizerError) as exc:  # data.strict=true or unusable inputs
        print(f"r1v3 sft: error: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if _is_rank0() and result["preempted"]:
        print(f"[sft] preempted: checkpoint at step {result['step']} in {result['checkpoint']}; requeue to resume")
    elif _is_rank0():
        losses = result["losses"] or [float("nan")]
        print(f"[sft] done: {result['step']} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}"
              + (f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else "")
              + f", skipped {result['skipped'] or 0}; checkpoint {result['checkpoint']}")
        if result["heldout"]:
            h = result["heldout"]
            print(f"[sft] held-out greedy answers: well-formed {h['well_formed']:.0%}, accuracy {h['accuracy']:.0%}"
                  f" ({len(h['items'])} samples)")
    destroy_parallel()
    return 0


def cmd_rl(args) -> int:
    """GRPO with colocated vLLM rollouts from a recipe (needs vLLM: the vLLM venv on CPU, docs/rollout.md)."""
    cfg = _load(args)
    _relaunched(args.nproc or processes_needed(cfg), sys.argv[1:])
    from megatron_r1v3.data.records import RecordError
    from megatron_r1v3.data.tokenizer import TokenizerError
    from megatron_r1v3.parallel import destroy_parallel
    from megatron_r1v3.rl.grpo import run_grpo

    try:
        result = _run_loop("rl", run_grpo, cfg)
    except (RecordError, TokenizerError) as exc:
        print(f"r1v3 rl: error: {exc}", file=sys.stderr)
        return 1
    if isinstance(result, int):
        return result
    if _is_rank0() and result["preempted"]:
        print(f"[rl] preempted: checkpoint at step {result['step']} in {result['checkpoint']}; requeue to resume")
    elif _is_rank0():
        train, evals = result["history"]["train"], result["history"]["eval"]
        if train:
            print(f"[rl] done: {result['step']} steps, reward {train[0]['reward/mean']:.3f} -> "
                  f"{train[-1]['reward/mean']:.3f}; checkpoint {result['checkpoint']}")
        if evals:
            print("[rl] held-out avg@k accuracy: " + ", ".join(f"step {e['step']} {e['accuracy']:.1%}" for e in evals))
    destroy_parallel()
    return 0


def _eval_config(args) -> RunConfig:
    """The recipe with the eval flags applied. `eval` scores every item unless `--limit N` (a `rl.eval_prompts=K`
    override still counts, the flag wins); `--max-new-tokens N` is the whole budget (the length schedule, a
    training knob, is cleared so its longest entry cannot raise it)."""
    overrides = list(args.overrides)
    if args.command == "eval":
        overrides.insert(0, "rl.eval_prompts=0")  # all items; user overrides and --limit come later and win
        if args.limit is not None:
            if args.limit < 0:
                raise ConfigError(f"--limit={args.limit} must be >= 0 (0 = every item)")
            overrides.append(f"rl.eval_prompts={args.limit}")
    if args.data:
        overrides.append(f"data.val=[{args.data}]")
    if args.samples:
        overrides.append(f"rl.eval_samples={args.samples}")
    if getattr(args, "blank_images", False):
        overrides.append("rl.eval_blank_images=true")
    if args.temperature is not None:
        overrides.append(f"rl.eval_temperature={args.temperature}")
    if args.max_new_tokens is not None:
        if args.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
        overrides += [f"rl.max_response_tokens={args.max_new_tokens}", "rl.length_schedule=[]"]
    args.overrides = overrides
    return _load(args)


def cmd_eval(args) -> int:
    """avg@k of one checkpoint on held-out records or a benchmark file with vLLM; per-item JSONL + summary (with
    the budget used and the prompts skipped as over `rl.max_prompt_tokens`)."""
    cfg = _eval_config(args)
    _relaunched(args.nproc or processes_needed(cfg), sys.argv[1:])
    import json
    from pathlib import Path

    from megatron_r1v3.data.records import RecordError
    from megatron_r1v3.data.tokenizer import TokenizerError
    from megatron_r1v3.parallel import destroy_parallel
    from megatron_r1v3.rl.checkpoints import checkpoint_dirs, evaluate_checkpoints, table, write_json
    from megatron_r1v3.rl.evaluate import skipped_path

    out = Path(args.out)
    try:
        results = _run_loop("eval", partial(evaluate_checkpoints, paths=checkpoint_dirs(args.checkpoint)[-1:],
                                            out_dir=out), cfg)
    except (RecordError, TokenizerError, FileNotFoundError) as exc:  # a bad benchmark row, nothing that fits,
        print(f"r1v3 eval: error: {exc}", file=sys.stderr)  # an unusable tokenizer, no checkpoint or data file
        return 1
    if isinstance(results, int):
        return results
    if _is_rank0():
        summary = dict(results[0], blank_images=cfg.rl.eval_blank_images)
        listed = skipped_path(out / "items" / Path(summary["checkpoint"]).name, 0)
        summary["skipped"] = [json.loads(x) for x in listed.read_text().splitlines()] if listed.is_file() else []
        write_json(out / "summary.json", summary)
        print(table(results))
        blind = " with blank images (blind control)" if cfg.rl.eval_blank_images else ""
        print(f"[eval] avg@{cfg.rl.eval_samples} accuracy {summary['accuracy']:.4f} on {summary['prompts']:.0f} items"
              f"{blind} (T={cfg.rl.eval_temperature}, max_new_tokens={summary['max_new_tokens']:.0f}, truncated "
              f"{summary['truncated']:.1%}); skipped {len(summary['skipped'])} over rl.max_prompt_tokens="
              f"{prompt_token_budget(cfg)}" + "".join(f"\n[eval] skipped {s['id']} ({s['source']}): {s['reason']}"
                                                     for s in summary["skipped"])
              + f"\n[eval] per-item answers in {out / 'items'}, summary in {out / 'summary.json'}")
    destroy_parallel()
    return 0


def cmd_select_checkpoint(args) -> int:
    """Rank a run's checkpoints by critical-token entropy on held-out prompts (spec §4); JSON + table."""
    cfg = _eval_config(args)
    if args.words:
        cfg.rl.critical_tokens = [w.strip() for w in args.words.split(",") if w.strip()]
    _relaunched(args.nproc or processes_needed(cfg), sys.argv[1:])
    from pathlib import Path

    from megatron_r1v3.parallel import destroy_parallel
    from megatron_r1v3.rl.checkpoints import checkpoint_dirs, evaluate_checkpoints, rank_checkpoints, table, write_json

    out = Path(args.out)
    results = _run_loop("select-checkpoint", partial(evaluate_checkpoints, paths=checkpoint_dirs(args.checkpoints),
                                                     out_dir=out), cfg)
    if isinstance(results, int):
        return results
    key = "critical_entropy_next" if args.next_token else "critical_entropy"
    ranking = rank_checkpoints(results, key, args.prefer)
    if _is_rank0():
        write_json(out / "selection.json", ranking)
        (out / "best").write_text(f"{ranking['best']}\n")
        print(table(ranking["ranking"], key))
        print(f"[select] best by {key} ({args.prefer}): {ranking['best']}; Spearman({key}, accuracy) = "
              f"{ranking['spearman_vs_accuracy']:.3f}")
    destroy_parallel()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r1v3", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="parameter counts of a model preset (meta device)")
    p.add_argument("--preset", default="r1v3-38b")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("train-step", help="parallel training steps of the model on random VLM batches")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_step)

    p = sub.add_parser("sft", help="supervised fine-tuning (cold-start SFT / connector-only tuning)")
    _add_config_args(p)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rl", help="GRPO with colocated vLLM rollouts (R1V3 stage 2)")
    _add_config_args(p)
    p.set_defaults(func=cmd_rl)

    for name, fn, helptext in (("eval", cmd_eval, "held-out avg@k of a checkpoint with vLLM samples"),
                               ("select-checkpoint", cmd_select_checkpoint,
                                "rank checkpoints by critical-token entropy (and accuracy) on held-out prompts")):
        p = sub.add_parser(name, help=helptext)
        _add_config_args(p)
        if name == "eval":
            p.add_argument("--checkpoint", required=True, help="a checkpoint dir or a run's checkpoints root (latest)")
        else:
            p.add_argument("--checkpoints", required=True, help="a run's checkpoints root (every step_*)")
            p.add_argument("--words", default=None, help="critical words, comma-separated (rl.critical_tokens)")
            p.add_argument("--prefer", choices=["high", "low"], default="high")
            p.add_argument("--next-token", action="store_true", help="rank by the entropy one token later")
        p.add_argument("--data", default=None, help="held-out JSONL/Parquet: our records or a benchmark export"
                       " (MMMU/MathVista layout, data/benchmark.py); default: the recipe's data.val")
        p.add_argument("--samples", type=int, default=None, help="k of avg@k (rl.eval_samples)")
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--max-new-tokens", "--max-tokens", dest="max_new_tokens", type=int, default=None,
                       help="response budget; replaces rl.max_response_tokens and the length schedule")
        if name == "eval":
            p.add_argument("--limit", type=int, default=None,
                           help="score the first N items (default / 0: every item of the data)")
            p.add_argument("--blank-images", action="store_true",
                           help="blind control: every image replaced by a white one of the same size")
        p.add_argument("--out", required=True)
        p.set_defaults(func=fn)

    conv = sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion").add_subparsers(
        dest="direction", required=True)
    p = conv.add_parser("hf-to-megatron", help="HF (remote-code or native InternVL layout) -> megatron dist ckpt")
    p.add_argument("--hf", required=True)
    p.add_argument("--vpp", type=int, default=None)
    p.set_defaults(func=cmd_convert)
    q = conv.add_parser("megatron-to-hf", help="megatron dist checkpoint -> sharded safetensors")
    q.add_argument("--megatron", required=True)
    q.add_argument("--layout", choices=["remote", "native"], default=None, help="default: the source layout")
    q.add_argument("--max-shard-size", default="5GB")
    q.add_argument("--config", default=None, help="the run's recipe or config.yaml (tiling, sampling defaults);"
                   " default: <run>/config.yaml above a <run>/checkpoints/step_N checkpoint")
    q.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the checkpoint's hf_assets)")
    q.add_argument("--weights-only", action="store_true",
                   help="weights, config.json and the checkpoint's assets only (not servable: no processor, chat"
                   " template or generation config are written)")
    q.set_defaults(func=cmd_convert)
    for sp in (p, q):
        sp.add_argument("--out", required=True)
        sp.add_argument("--tp", type=int, default=1)
        sp.add_argument("--pp", type=int, default=1)

    p = sub.add_parser("compare-hf", help="max |logit| difference between transformers and our Megatron model")
    p.add_argument("--hf", required=True)
    p.add_argument("--megatron", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--image", default=None)
    p.add_argument("--prompt", default=None)
    p.set_defaults(func=cmd_compare_hf)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)  # each command runs `setup_process` (see `_relaunched`)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"r1v3: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
