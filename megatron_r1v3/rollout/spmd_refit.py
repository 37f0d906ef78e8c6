"""Refit of the SPMD engines (`engine_group`): every engine rank receives, bucket by bucket, what its vLLM shard
loads, assembled on that rank from the training TP/PP shards of its model replica - no rank routes data for
another - and checks it against its own manifest.

Sliced (`sliced_names`): when an engine's TP is the trainer's and its ranks are a training TP group (engine rank =
TP rank; the 38B recipe: TP8 trainer, rollout TP8), each engine rank receives only its own TP shard of the tensors
vLLM splits as Megatron does (the decoder's: `Rule.serve_split`), converted to its slices of the HF tensors
(`mapping.shard_to_hf`) and placed into full-shaped buffers whose other rows/columns are never written - vLLM's
loaders read exactly that slice. No TP all-gather, no join: a rank moves 1/TP of the decoder. The ViT (vLLM pads
its heads its own way) and the connector (replicated in vLLM) still arrive whole. Otherwise every tensor arrives
whole and vLLM's loaders take their slice.

Transports (`iter_engine_tensors`):
- `shm` (host-memory weights, one host): every rank maps the shared-memory mirrors of its replica's ranks
  (`bridge.shm`, `dst=None`) and joins TP shards itself; a push is one local copy per rank plus reads. Sliced
  tensors skip the mirror: the ranks of one TP rank's pipeline group (they feed the same engine TP rank, one per
  engine) share one file of full-shaped HF buffers (`EngineSlices`); each places its own stage's slices there and
  all of them hand vLLM views of it - a rank copies 1/(TP*PP) of the sliced bytes, not 1/TP plus its mirror.
- `collective` (GPU, or several hosts): per tensor, an all-gather in the training TP group and a broadcast from the
  owning stage over the pipeline group; on GPU the tensors stay on the device and reach the in-process vLLM shard
  by reference (same process, same GPU - no copy, no IPC handle; `rollout.ipc` is for an engine in another
  process).

Freeze-aware (`RefitPlan`): parameters that cannot change (requires_grad False under `train.trainable`, e.g. a
frozen ViT) are pushed by the first refit only. Later plans carry every load group (`refit.group_of`: a layer or a
top-level block) that holds at least one trainable tensor - whole groups, because vLLM reloads a module only from
a complete group - and the manifest of each push lists exactly those names.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.mapping import VOCAB, ShardPiece, find_rule, hf_names, shard_to_hf, to_hf
from megatron_r1v3.bridge.shard import full_shape, global_named_parameters, is_tp_sharded, join_tp_parts
from megatron_r1v3.bridge.shm import SharedBuffers, shared_shards
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.rollout.refit import RefitStats, group_of, push_weights

LAYOUT = "native"
Entry = tuple[str, tuple[int, ...], torch.dtype, bool]  # (canonical name, full shape, dtype, trainable)
# Tests set this: the rows/columns of a sliced tensor that an engine rank does not receive are NaN, so a vLLM loader
# that read outside its slice would show in the logprobs.
POISON_UNSENT = False


def stage_manifests(chunks) -> list[list[Entry]]:
    """Per pipeline stage, (name, full shape, dtype, trainable) of its parameters in model order (collective over
    the pipeline group; trainable = requires_grad, i.e. what `train.trainable` left to the optimizer)."""
    mine = [(name, full_shape(p), p.dtype, bool(p.requires_grad))
            for chunk in chunks for name, p in global_named_parameters(chunk)]
    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        return [mine]
    out: list = [None] * pp
    dist.all_gather_object(out, mine, group=ps.get_pipeline_model_parallel_group())
    return out


@dataclass
class RefitPlan:
    """Which Megatron tensors one push carries, and the HF names its manifest expects (in stream order)."""

    carry: set[str]
    expected: list[str]
    skipped_tensors: int = 0
    skipped_bytes: int = 0
    skipped_groups: list[str] = field(default_factory=list)


def plan_refit(manifests: list[list[Entry]], model: ModelConfig, full: bool) -> RefitPlan:
    """Everything when `full` (the first push); otherwise every load group holding a trainable tensor, whole."""
    entries = [e for m in manifests for e in m]
    names_of = {name: hf_names(*find_rule(name), LAYOUT) for name, *_ in entries}
    if full:
        carried = {g for names in names_of.values() for g in map(group_of, names)}
    else:
        carried = {group_of(n) for name, _, _, trainable in entries if trainable for n in names_of[name]}
        while True:  # a Megatron tensor feeding a carried group carries all of its HF names: close over that
            grown = carried | {group_of(n) for names in names_of.values()
                               if any(group_of(m) in carried for m in names) for n in names}
            if grown == carried:
                break
            carried = grown
    plan = RefitPlan(set(), [])
    for name, shape, dtype, _ in entries:
        if any(group_of(n) in carried for n in names_of[name]):
            plan.carry.add(name)
            plan.expected.extend(names_of[name])
        else:
            plan.skipped_tensors += 1
            plan.skipped_bytes += math.prod(shape) * dtype.itemsize
    all_groups = {group_of(n) for names in names_of.values() for n in names}
    plan.skipped_groups = sorted(all_groups - carried)
    return plan


def engine_is_tp_group(engine_tp: int) -> bool:
    """Collective over the world: every rank's engine spans exactly its training TP group (engine rank = TP rank)."""
    tp = ps.get_tensor_model_parallel_world_size()
    rank = dist.get_rank()
    lead = rank - rank % engine_tp
    mine = engine_tp == tp > 1 and dist.get_process_group_ranks(
        ps.get_tensor_model_parallel_group()) == list(range(lead, lead + engine_tp))
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return all(everyone)


def sliced_names(manifests: list[list[Entry]], model: ModelConfig, tp: int) -> set[str]:
    """The Megatron tensors an engine rank receives as its own TP shard (engine TP = trainer TP): the `serve_split`
    rules; the vocab ones only when vLLM's padded rows per rank equal Megatron's (else they arrive whole)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import pad_vocab_size

    lm = model.language
    vocab_aligned = lm.padded_vocab_size // tp == pad_vocab_size(lm.vocab_size) // tp
    out = set()
    for name, *_ in (e for m in manifests for e in m):
        rule = find_rule(name)[0]
        if rule.serve_split and (vocab_aligned or rule.transform_for(LAYOUT) is not VOCAB):
            out.add(name)
    return out


def _place(buf: torch.Tensor, piece: ShardPiece) -> torch.Tensor:
    buf.narrow(piece.dim, piece.offset, piece.piece.shape[piece.dim]).copy_(piece.piece)
    return buf


def _placed(piece: ShardPiece, staging: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """A full-shaped HF tensor holding `piece` at its slice; nothing else of it is written (kept across pushes in
    `staging`: host memory pages are touched only where the slice lies)."""
    src = piece.piece
    buf = staging.get(piece.name) if staging is not None else None
    if buf is None or tuple(buf.shape) != piece.full_shape or buf.dtype != src.dtype:
        buf = torch.empty(piece.full_shape, dtype=src.dtype, device=src.device)
        if POISON_UNSENT:
            buf.fill_(float("nan"))
        if staging is not None:
            staging[piece.name] = buf
    return _place(buf, piece)


class EngineSlices:
    """The sliced tensors of one engine TP rank in shared memory (shm transport): a full-shaped buffer per HF tensor
    (`bridge.shm.SharedBuffers`) mapped by every rank of this TP rank's pipeline group - the ranks that feed the
    same engine TP rank, one per engine. Each rank places the slices of its own stage's shards (`place`); after the
    mirror's publish barrier every rank yields views of all stages' buffers."""

    def __init__(self, manifests: list[list[Entry]], sliced: set[str], model: ModelConfig):
        self.model, self.sliced = model, sliced
        self.tp_rank, self.tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
        self.group = ps.get_pipeline_model_parallel_group()
        shapes, self.pieces = {}, {}  # pieces: Megatron name -> [(hf name, bytes of this rank's slice)]
        for name, shape, dtype, _ in (e for m in manifests for e in m if e[0] in sliced):
            local = list(shape)
            local[find_rule(name)[0].tp_dim] //= self.tp
            meta = torch.empty(local, dtype=dtype, device="meta")  # the slices' names and shapes, no data
            pieces = shard_to_hf(name, meta, model, LAYOUT, self.tp_rank, self.tp)
            shapes.update({pc.name: (pc.full_shape, dtype) for pc in pieces})
            self.pieces[name] = [(pc.name, pc.piece.numel() * dtype.itemsize) for pc in pieces]
        self.buffers = SharedBuffers(shapes, self.group, float("nan") if POISON_UNSENT else None)

    def place(self, params: dict[str, torch.Tensor], carry: set[str]) -> None:
        """Collective over the pipeline group: this rank's carried sliced shards into the shared buffers (after a
        barrier: no rank still loads the previous push's views)."""
        dist.barrier(group=self.group)
        with torch.no_grad():
            for name, param in params.items():
                if name in self.sliced and name in carry:
                    for piece in shard_to_hf(name, param.detach(), self.model, LAYOUT, self.tp_rank, self.tp):
                        _place(self.buffers.views[piece.name], piece)

    def stream(self, name: str, received: list[int]) -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, nbytes in self.pieces[name]:
            received[0] += nbytes
            yield hf_name, self.buffers.views[hf_name]


_SLICES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[frozenset, EngineSlices]]" = weakref.WeakKeyDictionary()


def engine_slices(chunks, manifests: list[list[Entry]], sliced: set[str], model: ModelConfig) -> EngineSlices:
    """The `EngineSlices` of these model chunks, created on first use (collective over the pipeline group)."""
    cache = _SLICES.setdefault(chunks[0], {})
    key = frozenset(sliced)
    if key not in cache:
        cache[key] = EngineSlices(manifests, sliced, model)
    return cache[key]


def _tp_all_gather(param: torch.Tensor, gated: bool) -> torch.Tensor:
    """The full tensor on every rank of the training TP group (all-gather of the shards, gated-aware join)."""
    local = param.detach()
    if not is_tp_sharded(param):
        return local
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(parts, local.contiguous(), group=group)
    return join_tp_parts(parts, param.partition_dim, gated)


def _join_into(parts: list[torch.Tensor], dim: int, gated: bool, staging: dict[str, torch.Tensor] | None,
               name: str) -> torch.Tensor:
    """`join_tp_parts` into a buffer kept across pushes (`staging`): no allocation and first-touch page faults per
    refit, the join costs one copy of the bytes."""
    if staging is None:
        return join_tp_parts(parts, dim, gated)
    shape = list(parts[0].shape)
    shape[dim] *= len(parts)
    out = staging.get(name)
    if out is None or list(out.shape) != shape:
        out = staging[name] = torch.empty(shape, dtype=parts[0].dtype, device=parts[0].device)
    order = [h for p in parts for h in p.chunk(2, dim=dim)] if gated else parts
    if gated:
        order = order[0::2] + order[1::2]  # [gate_0, gate_1, ..., up_0, up_1, ...]
    return torch.cat(order, dim=dim, out=out)


def iter_engine_tensors(chunks, manifests: list[list[Entry]], plan: RefitPlan, model: ModelConfig,
                        transport: str = "auto", staging: dict[str, torch.Tensor] | None = None,
                        sliced: set[str] = frozenset(), received: list[int] | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective over the model-parallel group: `(hf_name, tensor)` of every carried tensor, on EVERY rank (each
    engine rank feeds its own vLLM shard): the full tensor, or for `sliced` names (`sliced_names`) a full-shaped one
    holding only this TP rank's slice. transport: auto (shm when possible, else collective) | shm | collective.
    `staging` (host memory): TP-sharded tensors are joined, and slices placed, into these buffers, kept by the
    caller across pushes. `received[0]` is increased by the bytes this rank received. Every rank must drain the
    stream."""
    params = {name: p for chunk in chunks for name, p in global_named_parameters(chunk)}
    shared = shared_shards(chunks, None) if transport in ("auto", "shm") else None
    if transport == "shm" and shared is None:
        raise ValueError("transport='shm' needs host-memory weights and every rank of the replica on one host")
    slices = engine_slices(chunks, manifests, sliced, model) if shared is not None and sliced else None
    if shared is not None:
        set_phase("engine refit (shm): publish")
        if slices is not None:
            slices.place(params, plan.carry)
        shared.publish(plan.carry - set(sliced))  # its barrier: every stage's slices are placed too
    my_stage = ps.get_pipeline_model_parallel_rank()
    pp_group = ps.get_pipeline_model_parallel_group() if len(manifests) > 1 else None
    stage_ranks = dist.get_process_group_ranks(pp_group) if pp_group is not None else [dist.get_rank()]
    device = next(iter(params.values())).device
    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    received = received if received is not None else [0]
    for stage, manifest in enumerate(manifests):
        set_phase(f"engine refit: stage {stage}")
        for name, shape, dtype, _ in manifest:
            if name not in plan.carry:
                continue
            if name in sliced and slices is not None:
                yield from slices.stream(name, received)
                continue
            if name in sliced:  # this TP rank's shard, from its stage over the pipeline group (same TP rank)
                local = list(shape)
                local[find_rule(name)[0].tp_dim] //= tp
                shard = (params[name].detach().contiguous() if stage == my_stage
                         else torch.empty(local, dtype=dtype, device=device))
                if pp_group is not None:
                    dist.broadcast(shard, src=stage_ranks[stage], group=pp_group)
                for piece in shard_to_hf(name, shard, model, LAYOUT, tp_rank, tp):
                    received[0] += piece.piece.numel() * piece.piece.element_size()
                    yield piece.name, _placed(piece, staging)
                continue
            if shared is not None:
                parts, dim = shared.parts(name)
                full = parts[0] if dim is None else _join_into(parts, dim, find_rule(name)[0].tp_gated, staging,
                                                               name)
            else:
                gated = find_rule(name)[0].tp_gated
                full = (_tp_all_gather(params[name], gated) if stage == my_stage
                        else torch.empty(shape, dtype=dtype, device=device))
                if pp_group is not None:
                    full = full.contiguous()
                    dist.broadcast(full, src=stage_ranks[stage], group=pp_group)
            for hf_name, tensor in to_hf(name, full, model, LAYOUT):
                received[0] += tensor.numel() * tensor.element_size()
                yield hf_name, tensor
    if shared is not None:
        shared.done()


class EngineRefit:
    """The refits of one run's engine rank: everything the first time, afterwards only what can change."""

    def __init__(self, chunks, model: ModelConfig, bucket_mb: int, transport: str = "auto",
                 freeze_aware: bool = True, engine_tp: int = 1, sliced: bool | None = None):
        """`engine_tp`: the engines' TP size; `sliced` None: per-rank slices whenever the engines are the training
        TP groups (`engine_is_tp_group`), False: whole tensors always, True: slices or a ValueError."""
        self.model, self.bucket_bytes, self.transport = model, bucket_mb * 2**20, transport
        self.freeze_aware = freeze_aware
        self.manifests = stage_manifests(chunks)
        self.pushes = 0
        self.sliced: set[str] = set()
        if sliced is not False and engine_is_tp_group(engine_tp):
            self.sliced = sliced_names(self.manifests, model, engine_tp)
        if sliced and not self.sliced:
            raise ValueError(f"sliced refit needs each engine (rollout TP {engine_tp}) to be a training TP group "
                             f"(TP {ps.get_tensor_model_parallel_world_size()})")
        # host memory: joined TP shards (shm transport) and placed slices, reused by every push
        on_host = next(p for chunk in chunks for p in chunk.parameters()).device.type == "cpu"
        self.staging: dict[str, torch.Tensor] | None = {} if on_host else None

    def plan(self) -> RefitPlan:
        return plan_refit(self.manifests, self.model, full=self.pushes == 0 or not self.freeze_aware)

    def __call__(self, engine, chunks, label: str = "") -> RefitStats:
        """Collective over the world: push this rank's share into `engine` (this rank's part of its engine);
        a manifest problem on any rank stops every rank with one `RefitError` naming the tensor and the rank."""
        plan, received = self.plan(), [0]
        stream = iter_engine_tensors(chunks, self.manifests, plan, self.model, self.transport, self.staging,
                                     self.sliced, received)
        stats = push_weights(engine, stream, plan.expected, self.bucket_bytes, agree=True, label=label)
        stats.skipped_tensors, stats.skipped_bytes = plan.skipped_tensors, plan.skipped_bytes
        stats.received_bytes = received[0]
        self.pushes += 1
        return stats
