"""SPMD rollout engines: `rl.rollout_tp` -> world / rollout_tp vLLM engines, each over rollout_tp consecutive ranks.

Every trainer rank builds its part of its engine in-process (vLLM's `external_launcher` executor) inside a
torch.distributed world of the engine's own (`engine.EngineWorld`: the engine's ranks, a rendezvous port picked by
its lead rank), so engines never wait on each other and the trainer's process groups stay untouched. Engines start
from config.json + tokenizer only (`load_format="dummy"`, `write_dummy_model_dir`): no weights on disk, the first
refit (`rollout.spmd_refit`) loads the real ones. An episode's prompts are split across the engines in contiguous
shares; every rank of an engine runs the same requests (vLLM's SPMD contract), and the engines' results are
gathered so every rank sees the whole episode (`generate_split`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_r1v3.config import ModelConfig


@dataclass(frozen=True)
class EngineLayout:
    """Which ranks form which engine: engine e = ranks [e·tp, (e+1)·tp); its lead is the first."""

    world: int
    tp: int
    ranks_per_node: int | None = None  # an engine must not span nodes (its ranks share host memory / NVLink)

    def __post_init__(self) -> None:
        if self.tp < 1 or self.world % self.tp:
            raise ValueError(f"rl.rollout_tp={self.tp} must be >= 1 and divide the world size {self.world}")
        if self.ranks_per_node and self.ranks_per_node % self.tp:
            raise ValueError(f"rl.rollout_tp={self.tp} must divide the ranks of a node ({self.ranks_per_node})")

    @property
    def engines(self) -> int:
        return self.world // self.tp

    def engine_of(self, rank: int) -> int:
        return rank // self.tp

    def engine_rank(self, rank: int) -> int:
        return rank % self.tp

    def lead(self, engine: int) -> int:
        return engine * self.tp

    def ranks(self, engine: int) -> list[int]:
        return list(range(engine * self.tp, (engine + 1) * self.tp))

    def shares(self, n: int) -> list[range]:
        """Contiguous near-equal shares of `n` prompts, one per engine (the first n % engines get one more)."""
        base, extra = divmod(n, self.engines)
        out, start = [], 0
        for e in range(self.engines):
            size = base + (1 if e < extra else 0)
            out.append(range(start, start + size))
            start += size
        return out


def write_dummy_model_dir(out_dir: str | Path, model_cfg: ModelConfig, tokenizer_dir: str | Path, dtype: torch.dtype,
                          serving=None) -> Path:
    """What vLLM needs to start with `load_format="dummy"`: config.json (native layout, `dtype`) and the serving
    files (tokenizer, processor, chat template, generation config); no weights (bytes of the 38B: a few MB)."""
    from megatron_r1v3.bridge.hf_io import hf_config_from_model
    from megatron_r1v3.rollout.hf_export import LAYOUT, ServingSettings, write_serving_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config_from_model(model_cfg, LAYOUT, dtype), indent=2))
    write_serving_files(out, model_cfg, tokenizer_dir, serving or ServingSettings(), LAYOUT)
    return out


def start_engine(layout: EngineLayout, model_dir: str | Path, **engine_kwargs):
    """Collective over the trainer's world: this rank's part of its engine (a `RolloutEngine`). Each engine's lead
    picks a rendezvous port on its host; every rank then joins its engine's world. `engine_kwargs` go to
    `RolloutEngine` (the same on every rank of an engine: vLLM's external launcher needs identical seeds)."""
    from megatron_r1v3.parallel.env import free_port
    from megatron_r1v3.rollout.engine import EngineWorld, RolloutEngine

    rank = dist.get_rank()
    if dist.get_world_size() != layout.world:
        raise ValueError(f"engine layout for {layout.world} ranks, world has {dist.get_world_size()}")
    engine = layout.engine_of(rank)
    mine = (free_port(), uuid.uuid4().hex[:8]) if rank == layout.lead(engine) else None
    leads: list = [None] * layout.world
    dist.all_gather_object(leads, mine)
    world = None
    if layout.tp > 1:
        port, tag = leads[layout.lead(engine)]
        world = EngineWorld(rank=layout.engine_rank(rank), size=layout.tp,
                            local_rank=int(os.environ.get("LOCAL_RANK", rank)), master_addr="127.0.0.1",
                            master_port=port, tag=f"{tag}e{engine}")
    return RolloutEngine(model_dir, world=world, **engine_kwargs)


@dataclass
class SplitResult:
    """An episode's samples in prompt order (the same on every rank) and how many prompts each engine served."""

    samples: list[list]  # per prompt: its `n` samples (`engine.Sample`)
    extra: list  # per prompt: what `on_lead` returned for it (None without `on_lead`)
    prompts_per_engine: list[int]
    seconds: float


def generate_split(engine, layout: EngineLayout, prompts: Sequence, seeds: Sequence[int],
                   on_lead: Callable[[range, list[list]], list] | None = None, **sampling) -> SplitResult:
    """Collective over the trainer's world: prompt share e is generated by engine e (all its ranks, same requests);
    the engines' samples are all-gathered so every rank gets the whole episode. `on_lead(share, samples)` runs on
    each engine's lead only, on its own share (e.g. reward scoring: engines score in parallel), and returns one
    picklable item per prompt, gathered like the samples."""
    rank, start = dist.get_rank(), time.perf_counter()
    shares = layout.shares(len(prompts))
    share = shares[layout.engine_of(rank)]
    outs = engine.generate([prompts[i] for i in share], seed=[seeds[i] for i in share], **sampling) if share else []
    lead = rank == layout.lead(layout.engine_of(rank))
    extra = (on_lead(share, outs) if on_lead else [None] * len(outs)) if lead else None
    if lead and len(extra) != len(outs):
        raise ValueError(f"on_lead returned {len(extra)} items for {len(outs)} prompts (rank {rank})")
    gathered: list = [None] * layout.world
    dist.all_gather_object(gathered, (outs, extra) if lead else None)
    samples, extras = [], []
    for e in range(layout.engines):
        got = gathered[layout.lead(e)]
        if got is None or len(got[0]) != len(shares[e]):
            raise RuntimeError(f"engine {e} (lead rank {layout.lead(e)}) returned no samples for its "
                               f"{len(shares[e])} prompts")
        samples.extend(got[0])
        extras.extend(got[1])
    return SplitResult(samples, extras, [len(s) for s in shares], time.perf_counter() - start)
