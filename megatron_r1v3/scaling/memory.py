"""Bytes per GPU of one training layout, from the shapes the model builds (arithmetic only).

Parameters come from the mapping table (`bridge/mapping.py`: shape, TP split, owning stage, in registration order):
ViT + connector + word embedding on the first (virtual) stage, decoder layers split by PP/VPP
(`first_stage_layers` = megatron `num_layers_in_first_pipeline_stage`), final norm + output layer on the last; a
TP-split tensor holds 1/TP of its elements per rank. Activations are the bytes autograd saves
for backward (the quantity `tools/validate_scaling.py` measures), per op of each implementation, times the
microbatches the pipeline schedule keeps in flight.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass

from megatron_r1v3.bridge.mapping import Rule, megatron_parameters
from megatron_r1v3.config import ModelConfig, VisionConfig, dtype_bytes
from megatron_r1v3.parallel.layout import ParallelLayout

GIB = 2**30


@dataclass(frozen=True)
class Layout(ParallelLayout):
    """A training layout: the process grid (`ParallelLayout`, with its rules), batch shape and the memory switches
    (impl: te = TE layers + flash attention as on GPU; local = megatron-core local spec with unfused attention, as
    the CPU runs use)."""

    micro_batch: int = 1
    num_microbatches: int = 1
    seq_length: int = 4096
    tiles_per_sample: int = 7
    recompute: bool = False
    distributed_optimizer: bool = True
    fp8: bool = False
    params_dtype: str = "bf16"
    impl: str = "te"

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.num_microbatches * self.dp

    def label(self) -> str:
        """Short name, e.g. `TP8·PP2·VPP2·DP2 mb1 rc dopt fp8`."""
        flags = [f"mb{self.micro_batch}"] + [
            name for name, on in (("sp", self.sequence_parallel), ("rc", self.recompute),
                                  ("dopt", self.distributed_optimizer), ("fp8", self.fp8)) if on
        ]
        if self.first_stage_layers is not None:
            flags.append(f"first{self.first_stage_layers}")
        grid = super().label()
        return grid + " " + " ".join(flags)


# ---------------------------------------------------------------- parameters (one entry per tensor, this TP rank)
def tensor_elements(rule: Rule, model: ModelConfig, tp: int) -> int:
    """Elements one TP rank holds of a parameter: 1/TP of a TP-split tensor, all of a replicated one."""
    n = math.prod(rule.shape(model))
    return n // tp if rule.tp_dim is not None else n


def decoder_layers_per_chunk(model: ModelConfig, layout: Layout) -> list[list[int]]:
    """[pp_rank][vp_stage] -> decoder layers (`ParallelLayout.decoder_layers`)."""
    return layout.decoder_layers(model.language.num_layers)


def chunk_tensors(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> dict[str, list[int]]:
    """Elements of each parameter tensor of one model chunk on one TP rank, by component (the names
    `count_parameters` uses), in registration order."""
    return {k: list(v) for k, v in _chunk_summary(model, layout, pp_rank, vp)[0].items()}


_CHUNKS: dict[tuple, tuple[dict[str, list[int]], int]] = {}


def _chunk_summary(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> tuple[dict[str, list[int]], int]:
    """(`chunk_tensors`, `fp8_gemm_weights`) of one chunk, cached by what they depend on (ranking the layouts of 2
    nodes asks ~30 000 times for a few hundred distinct chunks: 9.8 s -> under 2 s); keyed by the model's repr, so
    a changed config is a new entry."""
    pre = pp_rank == 0 and vp == 0
    post = pp_rank == layout.pp - 1 and vp == layout.chunks - 1
    layers = decoder_layers_per_chunk(model, layout)[pp_rank][vp]
    key = (repr(model), pre, post, layers, layout.tp)
    hit = _CHUNKS.get(key)
    if hit is None:
        tensors: dict[str, list[int]] = {}
        fp8 = 0
        for rule, _, _ in megatron_parameters(model, pre, post, range(layers)):
            n = tensor_elements(rule, model, layout.tp)
            tensors.setdefault(rule.megatron[0].split(".", 1)[0], []).append(n)
            fp8 += n if rule.fp8 else 0
        if len(_CHUNKS) >= 4096:
            _CHUNKS.clear()
        hit = _CHUNKS[key] = (tensors, fp8)
    return hit


def rank_parameters(model: ModelConfig, layout: Layout, pp_rank: int) -> Counter:
    """Parameters per component held by one rank of pipeline stage `pp_rank` (equals `count_parameters`)."""
    counts: Counter = Counter()
    for vp in range(layout.chunks):
        for name, sizes in chunk_tensors(model, layout, pp_rank, vp).items():
            counts[name] += sum(sizes)
    return counts


def ddp_buffer_elements(sizes: list[int], dp: int, distributed_optimizer: bool) -> int:
    """Elements of megatron DDP's contiguous buffer: with the distributed optimizer every param starts 64-aligned
    and the bucket end is padded to lcm(dp, 128) (one bucket: overlap_grad_reduce is off)."""
    if not distributed_optimizer:
        return sum(sizes)
    index = 0
    for n in reversed(sizes):  # megatron allocates in reverse registration order
        index = math.ceil(index / 64) * 64 + n
    div = math.lcm(dp, 128)
    return math.ceil(index / div) * div


def fp8_gemm_weights(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> int:
    """Elements of the GEMM weights that run in FP8 under TE in one chunk (decoder and connector linears)."""
    return _chunk_summary(model, layout, pp_rank, vp)[1]


def static_bytes(model: ModelConfig, layout: Layout, pp_rank: int) -> dict[str, float]:
    """Weights, fp32 grad buffers, Adam states and FP8 weight caches of one rank (bytes)."""
    pe = dtype_bytes(layout.params_dtype)
    weights = grads = 0.0
    params = 0
    gemm = 0
    for vp in range(layout.chunks):
        chunk = chunk_tensors(model, layout, pp_rank, vp)
        sizes = [n for part in chunk.values() for n in part]
        params += sum(sizes)
        buffer = ddp_buffer_elements(sizes, layout.dp * layout.cp, layout.distributed_optimizer)
        weights += buffer * pe  # with the distributed optimizer params live in DDP's (padded) param buffer
        grads += buffer * 4  # grad_reduce_in_fp32=True: fp32 main_grad buffer whatever the param dtype
        if layout.fp8:
            gemm += fp8_gemm_weights(model, layout, pp_rank, vp)
    states = 8 + (4 if pe != 4 else 0)  # exp_avg + exp_avg_sq (+ fp32 main params when params are 16-bit)
    shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
    return {
        "params": float(params),
        "weights": weights,
        "grads": grads,
        "optimizer": params * states / shard,
        # TE keeps an FP8 copy of each GEMM weight and its transpose between microbatches (1 byte each).
        "fp8_cache": 2.0 * gemm,
    }


# ---------------------------------------------------------------- activations saved for backward (bytes)
def _act_bytes(layout: Layout) -> int:
    return dtype_bytes(layout.params_dtype)


def decoder_layer_activation(model: ModelConfig, layout: Layout) -> float:
    """Bytes one decoder layer saves for one microbatch (no recompute)."""
    lm, t, e = model.language, layout.tp, _act_bytes(layout)
    h, d, f, nh, g = lm.hidden_size, lm.head_dim, lm.ffn_hidden_size, lm.num_heads, lm.num_kv_heads
    s, b = layout.seq_length // layout.cp, layout.micro_batch
    if layout.impl == "local":
        # torch RMSNorm (its weight stays fp32, so the residual stream is fp32): input, rstd, normalised x, + the
        # next linear's input. Unfused attention: q, k and v expanded to all heads, RoPE cos/sin for q and k,
        # causal mask, fp32 softmax probs [b, heads, s, s] (+ a 16-bit copy), proj input. SwiGLU: fc1 out, silu
        # out, the product and the fc2 input.
        per_token = 2 * ((8 + e) * h + 4) + 4 * nh * d // t * e + 5 * f // t * e
        probs = b * nh // t * s * s * (4 + (e if e < 4 else 0))
        return b * s * per_token + 4 * s * d * e + s * s + probs
    sp = t if layout.sequence_parallel else 1
    x = 1 if layout.fp8 else e  # TE saves FP8 GEMM inputs in FP8
    # TE LayerNormLinear: input + rsigma + ln_out (SP-sharded); flash attention: q, k, v, out, lse; proj input;
    # fused SwiGLU input (fc1 out) and the fc2 input.
    per_token = (2 * h * e + 8 + 2 * h * x) / sp + (nh + 2 * g) * d // t * e + nh * d // t * e + 4 * nh // t
    per_token += (nh * d // t if layout.fp8 else 0) + 2 * f // t * e + f // t * x
    return b * s * per_token


def vit_layer_activation_per_tile(v: VisionConfig, layout: Layout) -> float:
    """Bytes one InternViT layer saves per tile (our own module: same ops on CPU and GPU)."""
    t, e = layout.tp, _act_bytes(layout)
    n, h, f = v.grid**2 + 1, v.hidden_size, v.ffn_hidden_size // t
    w, heads = v.padded_heads * v.head_dim // t, v.padded_heads // t
    copies = 1 if e == 4 else 2  # `x.float()` is called twice: two fp32 copies unless x already is fp32
    norms = 2 * ((4 * copies + 2 * e) * h + 4)  # fp32 x, rstd, normalised x, weighted output (next linear's input)
    qk = 2 * ((4 * copies + e) * w + 4) if v.qk_normalization else 0
    attn = 6 * w * e + 4 * heads  # SDPA: normed q, k, the qkv output (v is a view), out, logsumexp
    return n * (norms + qk + attn + 2 * h * e + 2 * f * e)  # + layer-scale inputs, GELU in, fc2 in


def first_stage_extra(model: ModelConfig, layout: Layout) -> float:
    """Bytes saved outside the decoder layers on stage 0: ViT (all layers), pixels, connector, embedding."""
    v, e, t = model.vision, _act_bytes(layout), layout.tp
    tiles = layout.micro_batch * layout.tiles_per_sample
    n = v.grid**2 + 1
    if layout.recompute:
        vit_bytes = v.num_layers * tiles * n * v.hidden_size * e  # each checkpointed layer keeps its input
    else:
        vit_bytes = v.num_layers * tiles * vit_layer_activation_per_tile(v, layout)
    pixels = tiles * 3 * v.image_size**2 * e
    c = int(v.hidden_size / model.connector.downsample_ratio**2)
    conn = tiles * model.tokens_per_tile * (2 * c * e + 8 + 2 * model.language.hidden_size // t * e)
    tokens = layout.micro_batch * layout.seq_length  # ids (int64) + splice mask; at TP>1 masked ids + mask
    embed = tokens * (9 + (9 if t > 1 else 0))
    return vit_bytes + pixels + conn + embed


def last_stage_extra(model: ModelConfig, layout: Layout) -> float:
    """Final norm + output-layer input + cross entropy (fp32 softmax over the local vocab shard, mask, targets)."""
    lm, e, t = model.language, _act_bytes(layout), layout.tp
    tokens = layout.micro_batch * layout.seq_length // layout.cp
    if layout.impl == "local":
        norm = (8 + e) * lm.hidden_size + 4
    else:
        norm = (2 * lm.hidden_size * e + 4) / (t if layout.sequence_parallel else 1)
    return tokens * (norm + lm.padded_vocab_size // t * 4 + 9 + 4)


def chunk_activation(model: ModelConfig, layout: Layout, pp_rank: int, vp: int) -> dict[str, float]:
    """Bytes one microbatch leaves saved in one model chunk until its backward: decoder layers, the stage-0 part
    (ViT, pixels, connector, embedding) and the last-stage part (final norm, cross entropy)."""
    layers = decoder_layers_per_chunk(model, layout)[pp_rank][vp]
    if layout.recompute:
        decoder = layers * _layer_input(model, layout)
        if layout.impl == "local" and layers:
            decoder += layout.seq_length * model.language.head_dim * 4  # rotary freqs (fp32) kept per forward
    else:
        decoder = layers * decoder_layer_activation(model, layout)
    first = first_stage_extra(model, layout) if pp_rank == 0 and vp == 0 else 0.0
    last = last_stage_extra(model, layout) if pp_rank == layout.pp - 1 and vp == layout.chunks - 1 else 0.0
    return {"decoder": decoder, "first": first, "last": last, "total": decoder + first + last}


def _layer_input(model: ModelConfig, layout: Layout) -> float:
    """What a checkpointed decoder layer keeps: its input hidden states (SP-sharded with TE)."""
    sp = layout.tp if layout.sequence_parallel and layout.impl == "te" else 1
    tokens = layout.micro_batch * layout.seq_length // layout.cp
    return tokens * model.language.hidden_size * _act_bytes(layout) / sp


def schedule_order(layout: Layout, pp_rank: int, steady_limit: int | None = None) -> list[tuple[str, int]]:
    """(`F`|`B`, chunk) in the order megatron's 1F1B / interleaved schedule runs them on `pp_rank`; with
    `steady_limit`, only that many steady-state 1F1B pairs and no cooldown (enough to find the peak)."""
    pp, vpp, m = layout.pp, layout.chunks, layout.num_microbatches
    if pp == 1:
        return [("F", 0), ("B", 0)] * (m if steady_limit is None else min(m, steady_limit))
    total = m * vpp
    if vpp == 1:
        table = [0] * m
        warmup = pp - pp_rank - 1
    else:  # megatron get_schedule_table with microbatch_group_size_per_vp_stage = pp
        table = []
        for start in range(0, m, pp):
            group = range(start, m) if start + pp >= m else range(start, start + pp)
            table += [c for c in range(vpp) for _ in group]
        warmup = (pp - pp_rank - 1) * 2 + (vpp - 1) * pp
    warmup = min(warmup, total)
    order = [("F", table[k]) for k in range(warmup)]
    steady = total - warmup if steady_limit is None else min(total - warmup, steady_limit)
    for k in range(steady):
        order += [("F", table[warmup + k]), ("B", vpp - 1 - table[k])]
    if steady_limit is None:
        order += [("B", vpp - 1 - table[k]) for k in range(total - warmup, total)]
    return order


def peak_activation(model: ModelConfig, layout: Layout, pp_rank: int) -> float:
    """Most bytes saved for backward at once on `pp_rank`, following the schedule. With full recompute the
    backward of a chunk first frees its cross entropy, then re-runs one decoder layer (and, once the decoder is
    done, one ViT layer over all tiles) holding every tensor that layer saves."""
    parts = [chunk_activation(model, layout, pp_rank, vp) for vp in range(layout.chunks)]
    dec_extra = vit_extra = 0.0
    if layout.recompute:
        full = dataclasses.replace(layout, recompute=False)
        dec_extra = decoder_layer_activation(model, full) - _layer_input(model, full)
        v = model.vision
        tiles = layout.micro_batch * layout.tiles_per_sample
        vit_extra = tiles * (vit_layer_activation_per_tile(v, full) - (v.grid**2 + 1) * v.hidden_size * _act_bytes(
            layout))
    live = peak = 0.0
    # the live set repeats with the schedule table's period (pp·vpp), so a few periods of steady state suffice
    for kind, chunk in schedule_order(layout, pp_rank, steady_limit=2 * layout.pp * layout.chunks + 2):
        p = parts[chunk]
        if kind == "F":
            live += p["total"]
            peak = max(peak, live)
            continue
        if layout.recompute and p["decoder"]:
            peak = max(peak, live - p["last"] + dec_extra)
        if layout.recompute and p["first"]:
            peak = max(peak, live - p["last"] - p["decoder"] + vit_extra)
        live -= p["total"]
    return peak


def logits_transient(model: ModelConfig, layout: Layout, pp_rank: int) -> float:
    """Last stage: the 16-bit logits and their vocab-padding-masked copy live next to the saved fp32 softmax."""
    if pp_rank != layout.pp - 1:
        return 0.0
    tokens = layout.micro_batch * layout.seq_length // layout.cp
    return tokens * model.language.padded_vocab_size // layout.tp * 2 * _act_bytes(layout)


# ---------------------------------------------------------------- colocated vLLM
def vllm_bytes(model: ModelConfig, vllm_tp: int, gpu_memory_utilization: float, capacity: float,
               profile_bytes: float = 2 * GIB) -> dict[str, float]:
    """vLLM's reservation (utilization × capacity): bf16 weights / TP, a profiling allowance, the rest KV cache."""
    lm = model.language
    real = dataclasses.replace(  # vLLM holds the real ViT heads and vocab
        model, vision=dataclasses.replace(model.vision, head_pad_multiple=1),
        language=dataclasses.replace(lm, make_vocab_size_divisible_by=1))
    weights = 2.0 * sum(math.prod(rule.shape(real)) for rule, _, _ in megatron_parameters(real)) / vllm_tp
    kv_heads = math.ceil(lm.num_kv_heads / vllm_tp)  # replicated when TP exceeds the KV heads
    kv_per_token = 2 * lm.num_layers * kv_heads * lm.head_dim * 2
    reserved = gpu_memory_utilization * capacity
    return {"weights": weights, "kv_per_token": float(kv_per_token), "reserved": reserved,
            "kv_tokens": max(0.0, (reserved - weights - profile_bytes) / kv_per_token)}


@dataclass
class MemoryReport:
    """Bytes one rank of pipeline stage `pp_rank` holds at its training-time peak (by kind)."""

    pp_rank: int
    params: float
    weights: float
    grads: float
    optimizer: float
    fp8_cache: float
    activations: float
    transient: float
    overhead: float

    @property
    def static(self) -> float:
        return self.weights + self.grads + self.optimizer + self.fp8_cache

    @property
    def total(self) -> float:
        return self.static + self.activations + self.transient + self.overhead


def rank_memory(model: ModelConfig, layout: Layout, pp_rank: int, overhead: float = 0.0) -> MemoryReport:
    """Everything one rank of stage `pp_rank` holds at its training-time peak."""
    s = static_bytes(model, layout, pp_rank)
    return MemoryReport(pp_rank, s["params"], s["weights"], s["grads"], s["optimizer"], s["fp8_cache"],
                        peak_activation(model, layout, pp_rank), logits_transient(model, layout, pp_rank), overhead)


def worst_rank_memory(model: ModelConfig, layout: Layout, overhead: float = 0.0) -> MemoryReport:
    """The pipeline stage with the highest total (stage 0 carries the ViT, the last one the logits)."""
    return max((rank_memory(model, layout, r, overhead) for r in range(layout.pp)), key=lambda m: m.total)
