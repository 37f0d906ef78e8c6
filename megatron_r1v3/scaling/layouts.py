"""Enumerate the layouts of a model on N nodes, drop those the layout rules (`ParallelLayout.problems`, the same
checks a run makes at start) or the GPU memory reject, rank the rest by predicted throughput (samples/s)."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_r1v3.config import ModelConfig, RunConfig
from megatron_r1v3.parallel.layout import ParallelLayout
from megatron_r1v3.scaling.compute import H100, Hardware, step_time
from megatron_r1v3.scaling.memory import GIB, Layout, MemoryReport, vllm_bytes, worst_rank_memory


@dataclass(frozen=True)
class Rollout:
    """A vLLM engine colocated on the training GPUs (GRPO): asleep (weights offloaded, KV freed) while training,
    awake with `gpu_memory_utilization` × GPU memory while Megatron's weights, grads and optimizer stay resident."""

    vllm_tp: int = 8
    gpu_memory_utilization: float = 0.3
    sleep_residual: float = 1 * GIB  # CUDA graphs + context vLLM keeps while asleep


@dataclass
class Candidate:
    """One layout with its predicted memory, time and (when colocated) vLLM budget."""

    layout: Layout
    memory: MemoryReport
    time: dict
    vllm: Optional[dict] = None
    problems: list[str] = field(default_factory=list)
    rules_ok: bool = True  # passes the layout rules (memory aside)

    @property
    def feasible(self) -> bool:
        return not self.problems


def layout_from_config(cfg: RunConfig, dp: int, micro_batch: int, num_microbatches: int, seq_length: int,
                       tiles_per_sample: int, impl: str = "te") -> Layout:
    """The Layout a RunConfig trains with (params dtype `auto` resolves to fp32 for impl=local, bf16 otherwise)."""
    prec = cfg.precision
    dtype = prec.params_dtype if prec.params_dtype != "auto" else ("fp32" if impl == "local" else "bf16")
    grid = dataclasses.asdict(ParallelLayout.from_config(cfg.parallel))
    grid["dp"] = dp
    return Layout(
        **grid, micro_batch=micro_batch, num_microbatches=num_microbatches, seq_length=seq_length,
        tiles_per_sample=tiles_per_sample, recompute=cfg.model.activation_recompute,
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer, fp8=prec.fp8 is not None,
        params_dtype=dtype, impl=impl,
    )


def rule_violations(model: ModelConfig, layout: Layout, global_batch: int) -> list[str]:
    """The rules a run checks at start (`ParallelLayout.problems`, Transformer Engine available) for this layout's
    sequence length, microbatches and batch."""
    return layout.problems(model, te_available=True, seq_length=layout.seq_length,
                           num_microbatches=layout.num_microbatches, global_batch=global_batch,
                           micro_batch=layout.micro_batch)


def evaluate(model: ModelConfig, layout: Layout, hw: Hardware = H100, rollout: Optional[Rollout] = None,
             global_batch: Optional[int] = None) -> Candidate:
    """Predict memory and time; `problems` lists why the layout cannot run (empty = feasible)."""
    problems = rule_violations(model, layout, global_batch or layout.global_batch)
    memory = worst_rank_memory(model, layout, hw.overhead_bytes)
    cand = Candidate(layout, memory, step_time(model, layout, hw), problems=problems, rules_ok=not problems)
    train_peak = memory.total
    if rollout is not None:
        cand.vllm = vllm_bytes(model, rollout.vllm_tp, rollout.gpu_memory_utilization, hw.memory_bytes)
        train_peak += rollout.sleep_residual
        awake = memory.static + memory.overhead + cand.vllm["reserved"]
        cand.vllm["rollout_peak"] = awake
        if awake > hw.memory_bytes:
            problems.append(f"rollout phase {awake / GIB:.1f} GiB > {hw.memory_bytes / GIB:.1f} GiB")
        if cand.vllm["kv_tokens"] < layout.seq_length:
            problems.append(f"vLLM KV cache holds {cand.vllm['kv_tokens']:.0f} tokens < one sequence")
        if layout.world % rollout.vllm_tp or rollout.vllm_tp > hw.gpus_per_node:
            problems.append(f"vLLM TP {rollout.vllm_tp} does not fit the GPUs")
    if train_peak > hw.memory_bytes:
        problems.append(f"training peak {train_peak / GIB:.1f} GiB > {hw.memory_bytes / GIB:.1f} GiB")
    return cand


def first_stage_options(model: ModelConfig, pp: int) -> list[Optional[int]]:
    """None (even split) and every lighter first stage the remaining stages can split evenly."""
    layers = model.language.num_layers
    if pp < 2:
        return [None]
    return [None] + [f for f in range(1, layers // pp) if (layers - f) % (pp - 1) == 0]


def enumerate_layouts(
    model: ModelConfig, nodes: int, gpus_per_node: int = 8, global_batch: int = 1024, seq_length: int = 12288,
    tiles_per_sample: int = 7, tps=(1, 2, 4, 8), cps=(1, 2), vpps=(None, 2, 4), micro_batches=(1, 2),
    recompute=(False, True), distributed_optimizer=(True, False), fp8=(False, True),
) -> Iterator[Layout]:
    """Every combination with TP inside a node, PP over decoder layers, DP = the rest; SP on whenever TP > 1.
    The non-distributed optimizer is skipped where DP·CP = 1 (nothing to shard: the same layout)."""
    world = nodes * gpus_per_node
    grids = [(tp, cp, pp) for tp, cp in itertools.product(tps, cps) if tp <= gpus_per_node and world % (tp * cp) == 0
             for pp in range(1, model.language.num_layers + 1) if (world // (tp * cp)) % pp == 0]
    for tp, cp, pp in grids:
        dp = world // (tp * cp * pp)
        splits = [(v, None) for v in vpps if v is None or pp > 1]
        splits += [(None, f) for f in first_stage_options(model, pp) if f is not None]
        for (vpp, first), mb, rc, dopt, f8 in itertools.product(splits, micro_batches, recompute,
                                                                distributed_optimizer, fp8):
            if global_batch % (mb * dp) or (not dopt and dp * cp == 1 and True in distributed_optimizer):
                continue
            yield Layout(
                tp=tp, pp=pp, vpp=vpp, cp=cp, dp=dp, micro_batch=mb, num_microbatches=global_batch // (mb * dp),
                seq_length=seq_length, tiles_per_sample=tiles_per_sample, sequence_parallel=tp > 1, recompute=rc,
                distributed_optimizer=dopt, fp8=f8, first_stage_layers=first,
            )


def rank_layouts(model: ModelConfig, nodes: int, hw: Hardware = H100, rollout: Optional[Rollout] = None,
                 **enum_kwargs) -> list[Candidate]:
    """All enumerated layouts, feasible ones first, each group by predicted samples/s (fastest first)."""
    gbs = enum_kwargs.get("global_batch", 1024)
    cands = [evaluate(model, lay, hw, rollout, gbs)
             for lay in enumerate_layouts(model, nodes, hw.gpus_per_node, **enum_kwargs)]
    return sorted(cands, key=lambda c: (not c.feasible, -c.time["samples_per_s"], c.memory.total))
