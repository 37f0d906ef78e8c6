"""FLOPs of one training sample (ViT tiles + connector + decoder tokens) and the step time of a layout.

Step time = pipeline time of the slowest stage (compute at `mfu` × peak, plus exposed TP and pipeline
communication) + the data-parallel gradient sync (not overlapped: `optimizer.overlap_grad_reduce` is off by
default) + the memory-bound Adam update. FLOPs count multiply-adds as 2; backward = 2 × forward; full recompute
adds one forward of the decoder and ViT layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_r1v3.config import LanguageConfig, ModelConfig, VisionConfig
from megatron_r1v3.scaling.memory import (
    GIB,
    Layout,
    decoder_layers_per_chunk,
    rank_parameters,
)


@dataclass(frozen=True)
class Hardware:
    """One accelerator kind and its interconnect. The MFU values are assumptions (see docs/scaling.md)."""

    name: str = "H100-SXM5-80GB"
    memory_bytes: float = 81559 * 2**20  # what nvidia-smi reports as total for an "80 GB" H100
    peak_bf16: float = 989e12  # dense
    peak_fp8: float = 1979e12  # dense
    mfu: float = 0.45  # achieved share of the BF16 peak in GEMMs and attention kernels
    mfu_fp8: float = 0.30  # achieved share of the FP8 peak in FP8 GEMMs (≈1.33× the BF16 GEMM rate)
    gpus_per_node: int = 8
    intra_node_bw: float = 360e9  # NCCL all-reduce bus bandwidth over NVLink 4 (B/s)
    inter_node_bw: float = 45e9  # per GPU: one 400 Gb/s NDR port each, NCCL bus bandwidth (B/s)
    hbm_bw: float = 3.35e12 * 0.6  # achieved by the fused Adam update (B/s)
    overhead_bytes: float = 5 * GIB  # CUDA context, NCCL buffers, cuBLAS/TE workspaces, allocator fragmentation


H100 = Hardware()


# ---------------------------------------------------------------- forward FLOPs
def vit_flops_per_tile(v: VisionConfig) -> float:
    """Patch conv + layers over grid²+1 tokens; the zero padding heads are computed too (padded GEMMs)."""
    n, h, w = v.grid**2 + 1, v.hidden_size, v.padded_heads * v.head_dim
    gemm = 2 * n * (3 * w * h + w * h + 2 * h * v.ffn_hidden_size)
    attn = 2 * 2 * n * n * w  # QK^T and PV, bidirectional
    return 2 * v.grid**2 * 3 * v.patch_size**2 * h + v.num_layers * (gemm + attn)


def connector_flops_per_tile(model: ModelConfig) -> float:
    c = int(model.vision.hidden_size / model.connector.downsample_ratio**2)
    h = model.language.hidden_size
    return 2 * model.tokens_per_tile * (c * h + h * h)


def decoder_gemm_flops_per_token(lm: LanguageConfig) -> float:
    """One layer's linear layers (qkv, proj, fc1 [gate; up], fc2) per token."""
    h, d = lm.hidden_size, lm.head_dim
    return 2 * ((lm.num_heads + 2 * lm.num_kv_heads) * d * h + lm.num_heads * d * h + 3 * h * lm.ffn_hidden_size)


def decoder_attention_flops_per_token(lm: LanguageConfig, seq: int, causal_skip: bool) -> float:
    """QK^T and PV per token and layer; flash attention skips the masked half, the unfused path does not."""
    keys = seq / 2 if causal_skip else seq
    return 2 * 2 * keys * lm.num_heads * lm.head_dim


def sample_flops(model: ModelConfig, seq: int, tiles: int, causal_skip: bool = True) -> dict[str, float]:
    """Forward FLOPs of one sample by part (training = 3×; + 1× of vit/decoder with full recompute)."""
    lm = model.language
    return {
        "vit": tiles * vit_flops_per_tile(model.vision),
        "connector": tiles * connector_flops_per_tile(model),
        "decoder_gemm": seq * lm.num_layers * decoder_gemm_flops_per_token(lm),
        "attention": seq * lm.num_layers * decoder_attention_flops_per_token(lm, seq, causal_skip),
        "logits": seq * 2 * lm.hidden_size * lm.padded_vocab_size,
    }


def model_flops_per_sample(model: ModelConfig, seq: int, tiles: int) -> float:
    """Training FLOPs of one sample without recompute (the numerator of MFU)."""
    return 3 * sum(sample_flops(model, seq, tiles).values())


# ---------------------------------------------------------------- time
def _allreduce_s(nbytes: float, group: int, bw: float) -> float:
    return 0.0 if group <= 1 else 2 * (group - 1) / group * nbytes / bw


def stage_time(model: ModelConfig, layout: Layout, hw: Hardware, pp_rank: int) -> dict[str, float]:
    """Seconds one microbatch spends on stage `pp_rank` (all its virtual chunks): compute, TP comm, p2p."""
    lm, v = model.language, model.vision
    t, cp, e = layout.tp, layout.cp, 2 if layout.params_dtype != "fp32" else 4
    s, b = layout.seq_length, layout.micro_batch
    tokens = b * s / cp
    layers = sum(decoder_layers_per_chunk(model, layout)[pp_rank])
    rc = 1 if layout.recompute else 0
    bf16_rate, gemm_rate = hw.peak_bf16 * hw.mfu, hw.peak_bf16 * hw.mfu
    if layout.fp8:
        gemm_rate = hw.peak_fp8 * hw.mfu_fp8
    causal_skip = layout.impl == "te"
    gemm = layers * tokens * decoder_gemm_flops_per_token(lm) / t
    attn = layers * tokens * decoder_attention_flops_per_token(lm, s, causal_skip) / t
    compute = (3 + rc) * (gemm / gemm_rate + attn / bf16_rate)
    act_bytes = tokens * lm.hidden_size * e
    tp_comm = layers * (4 + 2 * rc) * _allreduce_s(act_bytes, t, hw.intra_node_bw)
    if pp_rank == 0:
        tiles = b * layout.tiles_per_sample
        compute += (3 + rc) * tiles * vit_flops_per_tile(v) / t / bf16_rate
        compute += 3 * tiles * connector_flops_per_tile(model) / t / gemm_rate
        vit_bytes = tiles * (v.grid**2 + 1) * v.hidden_size * e
        tp_comm += v.num_layers * (4 + 2 * rc) * _allreduce_s(vit_bytes, t, hw.intra_node_bw)
    if pp_rank == layout.pp - 1:
        compute += 3 * tokens * 2 * lm.hidden_size * lm.padded_vocab_size / t / bf16_rate
    p2p = 0.0
    if layout.pp > 1:
        cross_node = layout.tp * layout.cp * layout.dp >= hw.gpus_per_node
        bw = hw.inter_node_bw if cross_node else hw.intra_node_bw
        sp = t if layout.sequence_parallel else 1
        p2p = 2 * layout.chunks * act_bytes / sp / bw  # activation forward + its gradient backward, per chunk
    return {"compute": compute, "tp_comm": tp_comm, "p2p": p2p, "total": compute + tp_comm + p2p}


def step_time(model: ModelConfig, layout: Layout, hw: Hardware = H100) -> dict[str, float]:
    """Seconds per optimizer step and where they go; `samples_per_s` = global batch / step."""
    stages = [stage_time(model, layout, hw, r) for r in range(layout.pp)]
    slowest = max(st["total"] for st in stages)
    m = layout.num_microbatches
    pipeline = (m + (layout.pp - 1) / layout.chunks) * slowest if layout.pp > 1 else m * slowest
    params = max(sum(rank_parameters(model, layout, r).values()) for r in range(layout.pp))
    group = layout.dp * layout.cp
    spans_nodes = layout.tp * layout.cp * layout.dp > hw.gpus_per_node
    bw = hw.inter_node_bw if spans_nodes else hw.intra_node_bw
    e = 2 if layout.params_dtype != "fp32" else 4
    if layout.distributed_optimizer:  # reduce-scatter fp32 grads + all-gather updated params
        dp_sync = (group - 1) / group * params * (4 + e) / bw if group > 1 else 0.0
        shard = params / group
    else:
        dp_sync = _allreduce_s(4 * params, group, bw)
        shard = params
    optimizer = shard * 30 / hw.hbm_bw  # fp32 main param, 2 moments (read + write), grad read, param write
    total = pipeline + dp_sync + optimizer
    bubble = (layout.pp - 1) / layout.chunks * slowest if layout.pp > 1 else 0.0
    flops = model_flops_per_sample(model, layout.seq_length, layout.tiles_per_sample) * layout.global_batch
    return {
        "step_s": total,
        "pipeline_s": pipeline,
        "bubble_s": bubble,
        "dp_sync_s": dp_sync,
        "optimizer_s": optimizer,
        "tp_comm_s": m * max(st["tp_comm"] for st in stages),
        "samples_per_s": layout.global_batch / total,
        "tokens_per_s": layout.global_batch * layout.seq_length / total,
        "mfu": flops / (total * layout.world * hw.peak_bf16),
    }


def group_vision_saving(model: ModelConfig, seq: int, tiles: int, group: int) -> dict[str, float]:
    """Training FLOPs of one GRPO group of `group` rows sharing one image set (`tiles` tiles, rows of `seq`
    tokens): every row running its own ViT + connector vs one vision forward per group (`rl/batch.py`)."""
    parts = sample_flops(model, seq, tiles)
    vision = 3 * (parts["vit"] + parts["connector"])
    text = 3 * (parts["decoder_gemm"] + parts["attention"] + parts["logits"])
    unshared, shared = group * (vision + text), vision + group * text
    return {"unshared": unshared, "shared": shared, "saving": 1.0 - shared / unshared,
            "vision_share_of_row": vision / (vision + text)}
