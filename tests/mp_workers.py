"""Functions that run inside spawned ranks (via megatron_r1v3.parallel.spawn.run_distributed) for the parallel tests.

Reference = one process at TP1·PP1; the parallel runs load the reference's dist checkpoint at their own layout and
compare logits / updated weights against it.
"""

from __future__ import annotations

import torch

TINY_VIT_PADDED = ["model.vision.hidden_size=48", "model.vision.num_heads=3"]  # 3 heads: TP2 needs padding


def _setup(overrides: list[str]):
    from megatron_r1v3.parallel import init_parallel, set_model_parallel
    from megatron_r1v3.presets import load_config

    cfg = load_config(None, ["model.preset=tiny", *overrides])
    import torch.distributed as dist

    state = set_model_parallel(cfg) if dist.is_initialized() else init_parallel(cfg)
    return cfg, state


def _batches(cfg, num=8):
    from megatron_r1v3.training.random_batch import random_microbatches

    return random_microbatches(cfg.model, num, micro_batch_size=1, seq_length=24, tiles_per_sample=2, seed=7)


def _logits(cfg, chunks, batches):
    from megatron_r1v3.training.step import forward_logits

    return forward_logits(chunks, batches, cfg.model.language.vocab_size)


def _packed_batches(cfg, num=2):
    """Packed microbatches `[2, 48]` laid out as `SFTBatchIterator(pack=True)` does: two random one-tile image samples
    per row, then a padding segment; cu_seqlens over the flattened tokens, positions restarting per segment."""
    from megatron_r1v3.training.random_batch import random_microbatches

    b, s, out = 2, 48, []
    for k in range(num):
        ids = torch.full((b, s), cfg.model.pad_token_id)
        labels, mask, pos = ids.clone(), torch.zeros(b, s), torch.zeros(b, s, dtype=torch.int64)
        starts, pixels = [], []
        for r, lengths in enumerate(((20, 14), (17, 22))):
            off = 0
            for j, n in enumerate(lengths):
                one = random_microbatches(cfg.model, 1, 1, n, 1, seed=100 + 4 * k + 2 * r + j)[0]
                ids[r, off : off + n], labels[r, off : off + n] = one["input_ids"][0], one["labels"][0]
                mask[r, off : off + n], pos[r, off : off + n] = one["loss_mask"][0], torch.arange(n)
                starts.append(r * s + off)
                pixels.append(one["pixel_values"])
                off += n
            starts.append(r * s + off)
            pos[r, off:] = torch.arange(s - off)
        cu = torch.tensor([*starts, b * s], dtype=torch.int32)
        out.append({"input_ids": ids, "labels": labels, "loss_mask": mask, "pixel_values": torch.cat(pixels),
                    "position_ids": pos, "cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()),
                    "packed": True})
    return out


def packed_parity(workdir: str, overrides: list[str]) -> dict:
    """Packed (THD) microbatches at this layout from the TP1 checkpoint: max |logit diff| vs the TP1 reference's
    packed logits (p2p shape [b*s, 1, h] through the pipeline); raises past 1e-5 or when no rank compared."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import load_model

    cfg, state = _setup(overrides)
    chunks = build_model(cfg)
    load_model(chunks, f"{workdir}/ckpt")
    logits = _logits(cfg, chunks, _packed_batches(cfg))
    diff, compared = torch.tensor([0.0]), torch.tensor([0.0])
    if logits is not None:
        diff = (torch.stack(logits) - torch.load(f"{workdir}/reference.pt")["logits_packed"]).abs().max().reshape(1)
        compared += 1
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    dist.all_reduce(compared)
    ps.destroy_model_parallel()
    result = {"max_abs_diff": float(diff), "ranks_compared": int(compared), "tp": state.tp, "pp": state.pp}
    if result["ranks_compared"] < 1 or result["max_abs_diff"] > 1e-5:
        raise AssertionError(f"packed logits at {overrides} differ from TP1: {result}")
    return result


def reference(workdir: str) -> dict:
    """TP1 model: logits + checkpoint; plus the 3-head ViT unpadded, and padded at TP1 from the same weights."""
    from megatron_r1v3.bridge.mapping import pad_heads
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import save_model

    out = {}
    cfg, _ = _setup([])
    chunks = build_model(cfg)
    out["logits"] = torch.cat(_logits(cfg, chunks, _batches(cfg)))
    out["logits_packed"] = torch.stack(_logits(cfg, chunks, _packed_batches(cfg)))
    save_model(chunks, f"{workdir}/ckpt")

    cfg_u, _ = _setup([*TINY_VIT_PADDED, "model.vision.head_pad_multiple=1"])
    unpadded = build_model(cfg_u)[0]
    out["logits_3heads"] = torch.cat(_logits(cfg_u, [unpadded], _batches(cfg_u)))
    cfg_p, _ = _setup([*TINY_VIT_PADDED, "model.vision.head_pad_multiple=2"])
    padded = build_model(cfg_p)[0]
    kinds = {"attn.qkv.weight": "qkv", "attn.q_norm.weight": "norm", "attn.k_norm.weight": "norm",
             "attn.proj.weight": "proj"}
    state = {}
    for name, t in unpadded.state_dict().items():
        kind = next((k for s, k in kinds.items() if name.endswith(s)), None)
        state[name] = pad_heads(t, kind, cfg_u.model.vision, cfg_p.model.vision.padded_heads) if kind else t
    padded.load_state_dict(state)
    out["logits_3heads_padded_tp1"] = torch.cat(_logits(cfg_p, [padded], _batches(cfg_p)))
    save_model([padded], f"{workdir}/ckpt_padded")
    torch.save(out, f"{workdir}/reference.pt")
    return {k: v.shape for k, v in out.items()}


LAYOUTS = [
    ("tp2", ["parallel.tensor=2"], "ckpt", "logits"),
    ("pp2", ["parallel.pipeline=2"], "ckpt", "logits"),
    ("pp2_vpp2", ["parallel.pipeline=2", "parallel.virtual_pipeline=2"], "ckpt", "logits"),
    ("tp2_pp2", ["parallel.tensor=2", "parallel.pipeline=2"], "ckpt", "logits"),
    ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"], "ckpt", "logits"),
    ("tp2_pp2_sp", ["parallel.tensor=2", "parallel.pipeline=2", "parallel.sequence_parallel=true"], "ckpt", "logits"),
    ("tp2_vit_padded", ["parallel.tensor=2", *TINY_VIT_PADDED, "model.vision.head_pad_multiple=2"],
     "ckpt_padded", "logits_3heads"),
]


def parity(workdir: str, layouts: list[str]) -> dict:
    """Each layout: load the TP1 checkpoint, forward this DP rank's share of the batches, max |diff| vs reference.

    Also counts the ranks that compared logits and the samples they compared (summed over ranks), so a run in
    which no rank held logits (diff stays 0) cannot pass as parity."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import load_model
    from megatron_r1v3.parallel.phase import set_phase

    ref = torch.load(f"{workdir}/reference.pt")
    result = {}
    for name, overrides, ckpt, ref_key in (layout for layout in LAYOUTS if layout[0] in layouts):
        set_phase(f"parity {name}: setup")
        cfg, state = _setup(overrides)
        chunks = build_model(cfg)
        load_model(chunks, f"{workdir}/{ckpt}")
        set_phase(f"parity {name}: forward")
        mine = list(range(len(_batches(cfg))))[state.dp_rank :: state.dp]
        batches = _batches(cfg)
        logits = _logits(cfg, chunks, [batches[i] for i in mine])
        diff, compared = torch.tensor([0.0]), torch.tensor([0.0, 0.0])
        if logits is not None:
            diff = (torch.cat(logits) - ref[ref_key][mine]).abs().max().reshape(1)
            compared = torch.tensor([1.0, float(len(logits))])
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        dist.all_reduce(compared)
        result[name] = {"max_abs_diff": float(diff), "dp": state.dp, "tp": state.tp, "pp": state.pp,
                        "ranks_compared": int(compared[0]), "samples_compared": int(compared[1]),
                        "samples": len(batches)}
        del chunks
        set_phase(f"parity {name}: done")
    ps.destroy_model_parallel()
    return result


def optimizer_step(workdir: str, overrides: list[str], tag: str, compare: bool) -> dict:
    """One DDP + (distributed) optimizer step from the reference checkpoint on this DP rank's share of 4 batches.

    compare=False (reference run): save the updated model to `{tag}_after`. compare=True: load that checkpoint into
    a second model at this layout and return the max |param difference| over all ranks.
    """
    import torch.distributed as dist

    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import load_model, save_model
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.step import train_step

    cfg, state = _setup(overrides)
    chunks = build_model(cfg)
    load_model(chunks, f"{workdir}/ckpt")
    ddp = wrap_ddp(chunks, cfg)
    opt = build_optimizer(ddp, cfg)
    batches = _batches(cfg, num=4)
    metrics = train_step(ddp, opt, batches[state.dp_rank :: state.dp])
    metrics = {k: v for k, v in metrics.items() if k != "outputs"}
    if not compare:
        save_model(chunks, f"{workdir}/{tag}_after")
        torch.save(metrics, f"{workdir}/{tag}_metrics.pt")
        return metrics
    metrics["reference"] = torch.load(f"{workdir}/{tag}_metrics.pt")
    expected = build_model(cfg)
    load_model(expected, f"{workdir}/{tag}_after")
    diff = torch.tensor([0.0])
    for got, want in zip(chunks, expected):
        for (_, p), (_, q) in zip(got.named_parameters(), want.named_parameters()):
            diff = torch.maximum(diff, (p.detach() - q.detach()).abs().max().reshape(1))
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return {**metrics, "max_param_diff": float(diff)}


def hang_on_rank1() -> None:
    """Rank 1 never reaches the barrier: the launcher must report its phase."""
    import time

    from megatron_r1v3.parallel.phase import set_phase

    cfg, state = _setup([])
    if state.rank == 1:
        set_phase("stuck before barrier")
        time.sleep(3600)
    set_phase("waiting in barrier")
    import torch.distributed as dist

    dist.barrier()


def raise_on_rank1() -> None:
    """Rank 1 raises: the launcher must report rank, phase and traceback."""
    from megatron_r1v3.parallel.phase import set_phase

    set_phase("about to fail")
    import os

    if os.environ["RANK"] == "1":
        raise ValueError("deliberate failure")


def report_then_sleep(out_dir: str, seconds: float) -> None:
    """Write this rank's pid, the launcher's `R1V3_TEST_MARK` and whether megatron-core was imported before the
    target was (the forkserver's preload), then sleep."""
    import json
    import os
    import sys
    import time

    preloaded = "megatron.core" in sys.modules
    info = {"pid": os.getpid(), "mark": os.environ.get("R1V3_TEST_MARK"), "preloaded": preloaded}
    with open(f"{out_dir}/rank{os.environ['RANK']}.json.tmp", "w") as f:
        json.dump(info, f)
    os.replace(f"{out_dir}/rank{os.environ['RANK']}.json.tmp", f"{out_dir}/rank{os.environ['RANK']}.json")
    time.sleep(seconds)


SGD = ["optimizer.name=sgd", "optimizer.lr=0.1", "optimizer.use_distributed_optimizer=false"]
ADAM = ["optimizer.name=adam", "optimizer.lr=1e-3", "optimizer.use_distributed_optimizer=true"]


def reference_with_optimizer(workdir: str) -> dict:
    """`reference()` plus the TP1·DP1 optimizer steps (SGD and Adam) whose results the parallel runs compare to."""
    shapes = reference(workdir)
    optimizer_step(workdir, SGD, "sgd", compare=False)
    optimizer_step(workdir, ADAM, "adam", compare=False)
    return shapes


def four_rank_checks(workdir: str) -> dict:
    """At world size 4: TP2·PP2 (DP1) logits parity, then one optimizer step at TP2·DP2 with SGD (also with sequence
    parallel) and with Adam (distributed optimizer), and one SGD step at TP2·PP2 (pipelined backward +
    embedding-group grad sync; SGD because Adam's first step, ~lr*sign(g), hides gradient-scale errors)."""
    out = parity(workdir, ["tp2_pp2"])
    out["packed_tp2_pp2_sp"] = packed_parity(workdir, ["parallel.tensor=2", "parallel.pipeline=2",
                                                       "parallel.sequence_parallel=true"])
    out["sgd_tp2_dp2"] = optimizer_step(workdir, ["parallel.tensor=2", *SGD], "sgd", compare=True)
    out["sgd_tp2_sp_dp2"] = optimizer_step(workdir, ["parallel.tensor=2", "parallel.sequence_parallel=true", *SGD],
                                           "sgd", compare=True)
    out["adam_tp2_dp2"] = optimizer_step(workdir, ["parallel.tensor=2", *ADAM], "adam", compare=True)
    out["sgd_tp2_pp2"] = optimizer_step(workdir, ["parallel.tensor=2", "parallel.pipeline=2", *SGD], "sgd",
                                        compare=True)
    return out


def sharded_layout(megatron_dir: str, tp: int, pp: int) -> dict:
    """The real model's sharded_state_dict at tp·pp, as {key: (global shape, dtype)} plus ShardedObject unique keys
    (factories applied, as dist_checkpointing.save does). Used to check the converter's one-process layout."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    from megatron_r1v3.bridge.convert import build_for_conversion, conversion_run_config, read_meta
    from megatron_r1v3.config import torch_dtype
    from megatron_r1v3.models.weights import model_sharded_state_dict

    meta = read_meta(megatron_dir)
    _, chunks = build_for_conversion(conversion_run_config(meta["model"], torch_dtype(meta["dtype"]), tp, pp, None))
    ssd = model_sharded_state_dict(chunks)
    apply_factories(ssd)
    tensors, objects = {}, set()
    for v in nested_values(ssd):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = (tuple(v.global_shape), str(v.dtype))
        elif isinstance(v, ShardedObject):
            objects.add(v.unique_key)
    return {"tensors": tensors, "objects": objects}


def _rl_microbatches(cfg, state, share_vision: bool = True):
    """A GRPO episode without vLLM: 4 rows (2 prompts x 2 responses of 5, 9, 13, 17 tokens) with image tokens,
    advantages and behaviour logprobs, as `rl.batch.episode_microbatches` builds them for this DP rank (2 rows per
    microbatch, or by `rl.micro_batch_tokens`)."""
    from megatron_r1v3.rl.batch import Rollout, episode_microbatches

    g = torch.Generator().manual_seed(11)
    m, n_img = cfg.model, 2 * cfg.model.tokens_per_tile
    prompt = [m.image_start_token_id] + [m.image_context_token_id] * n_img + [m.image_end_token_id, 40, 41, 42]
    pixels = {i: torch.randn(2, 3, m.vision.image_size, m.vision.image_size, generator=g) for i in range(2)}
    rows = [Rollout(i // 2, prompt, torch.randint(50, 900, (5 + 4 * i,), generator=g).tolist(), [-2.0] * (5 + 4 * i),
                    1.0, 1.0, 1.0, "stop", 1, advantage=(1.0, -0.5, 0.8, -0.2)[i]) for i in range(4)]
    return episode_microbatches(rows, state, 2, m, pixels.__getitem__, 1, share_vision, cfg.rl.micro_batch_tokens)


def bf16_vs_fp32_steps(workdir: str) -> dict:
    """TP2·PP2 from one fp32 checkpoint: an SFT step (token loss) and a GRPO step (policy loss after the old-logprob
    pass), each in fp32 and in bf16 (fp32 main params and grads in the distributed optimizer)."""
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import load_model, save_model
    from megatron_r1v3.rl.policy_loss import count_units, loss_function, write_logprobs
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.step import train_step

    layout = ["parallel.tensor=2", "parallel.pipeline=2", "optimizer.lr=1e-3"]
    cfg, _ = _setup(["precision.params_dtype=fp32", *layout])
    save_model(build_model(cfg), f"{workdir}/bf16_init")
    out = {}
    for dtype in ("fp32", "bf16"):
        for kind in ("sft", "grpo"):
            cfg, state = _setup([f"precision.params_dtype={dtype}", *layout])
            chunks = build_model(cfg)
            load_model(chunks, f"{workdir}/bf16_init")
            ddp = wrap_ddp(chunks, cfg)
            opt = build_optimizer(ddp, cfg)
            if kind == "sft":
                metrics = train_step(ddp, opt, _batches(cfg, num=2))
            else:
                mbs = _rl_microbatches(cfg, state)
                write_logprobs(ddp, mbs, "old_logp")
                metrics = train_step(ddp, opt, mbs, loss_function(cfg.rl, count_units(mbs, cfg.rl.agg), len(mbs)))
            params = {n: p.detach().float().clone() for c in chunks for n, p in c.named_parameters()}
            main_dtypes = {str(p.dtype) for o in getattr(opt, "chained_optimizers", [opt])
                           for group in o.optimizer.param_groups for p in group["params"]}
            out[f"{kind}_{dtype}"] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                                      "param_dtypes": sorted({str(p.dtype) for c in chunks for p in c.parameters()}),
                                      "main_param_dtypes": sorted(main_dtypes), "params": params}
    result = {}
    for kind in ("sft", "grpo"):
        a, b = out[f"{kind}_fp32"], out[f"{kind}_bf16"]
        # beyond bf16's storage rounding (2^-8 relative): how far the bf16 step's weights are from fp32's
        excess = max(float(((b["params"][n] - a["params"][n]).abs() - 2**-8 * a["params"][n].abs()).max())
                     for n in a["params"])
        result[kind] = {"loss_fp32": a["loss"], "loss_bf16": b["loss"], "grad_norm_fp32": a["grad_norm"],
                        "grad_norm_bf16": b["grad_norm"], "param_excess": excess,
                        "param_dtypes": b["param_dtypes"], "main_param_dtypes": b["main_param_dtypes"]}
    result["shared_vision"] = shared_vision_step(workdir)
    import torch.distributed as dist

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    return gathered


def shared_vision_step(workdir: str) -> dict:
    """TP2·PP2 fp32, one GRPO SGD step (lr 1: the update is the gradient) with each group's image set encoded once
    and with one vision forward per row: updated weights, losses and ViT work compared (issue 15)."""
    import torch.distributed as dist

    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import load_model
    from megatron_r1v3.rl.batch import vision_counts
    from megatron_r1v3.rl.policy_loss import count_units, loss_function, write_logprobs
    from megatron_r1v3.training.optimizer import build_optimizer, wrap_ddp
    from megatron_r1v3.training.step import train_step

    runs = {}
    for share, budget in ((False, 0), (True, 0), ("budget", 56)):
        # budget: rows padded to 24, 24, 32, 32 tokens -> microbatches [2, 24], [1, 32], [1, 32] (variable shapes)
        cfg, state = _setup(["precision.params_dtype=fp32", "parallel.tensor=2", "parallel.pipeline=2",
                             "optimizer.name=sgd", "optimizer.lr=1.0", "optimizer.min_lr=1.0",
                             "optimizer.use_distributed_optimizer=false", f"rl.micro_batch_tokens={budget}"])
        chunks = build_model(cfg)
        load_model(chunks, f"{workdir}/bf16_init")
        ddp = wrap_ddp(chunks, cfg)
        opt = build_optimizer(ddp, cfg)
        mbs = _rl_microbatches(cfg, state, bool(share))
        write_logprobs(ddp, mbs, "old_logp")
        metrics = train_step(ddp, opt, mbs, loss_function(cfg.rl, count_units(mbs, cfg.rl.agg), len(mbs)))
        counts = vision_counts(mbs, chunks)
        dist.all_reduce(counts)  # TP2: each of the two first-stage ranks counts the same tiles
        runs[share] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "counts": (counts / 2).tolist(),
                       "shapes": [tuple(mb["input_ids"].shape) for mb in mbs],
                       "params": {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}}
    unshared = runs[False]["params"]
    diff = torch.tensor([max(float((runs[k]["params"][n] - p).abs().max()) for n, p in unshared.items())
                         for k in (True, "budget")])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    names = {False: "unshared", True: "shared", "budget": "budget"}
    return {"max_update_diff": float(diff[0]), "max_update_diff_budget": float(diff[1]),
            **{f"{k}_{names[share]}": v for share, r in runs.items() for k, v in r.items() if k != "params"}}
