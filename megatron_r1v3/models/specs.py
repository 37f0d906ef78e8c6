"""Transformer configs and layer specs: TE spec (with FP8 settings) when TE imports, else megatron-core local spec.
The parallel degrees come from the run's `ParallelLayout` (the one object that decides them)."""

from __future__ import annotations

import dataclasses
import importlib

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v3.config import ConfigError, RunConfig, torch_dtype
from megatron_r1v3.models.norm import SpecRMSNorm
from megatron_r1v3.models.packing import PackedDotProductAttention
from megatron_r1v3.parallel import te_available
from megatron_r1v3.parallel.layout import ParallelLayout


def use_transformer_engine(cfg: RunConfig) -> bool:
    """Resolve `precision.transformer_impl` (auto -> TE exactly when it imports)."""
    impl = cfg.precision.transformer_impl
    if impl == "local":
        return False
    if impl == "transformer_engine" and not te_available():
        raise ConfigError("precision.transformer_impl='transformer_engine' but transformer_engine is not importable")
    return te_available()


def params_dtype(cfg: RunConfig) -> torch.dtype:
    """`auto` means bf16 on GPU and fp32 on CPU."""
    name = cfg.precision.params_dtype
    if name == "auto":
        name = "bf16" if torch.cuda.is_available() else "fp32"
    return torch_dtype(name)


# What megatron-core's fusions import when they run (megatron/core/fusions): the masked softmax calls Apex's compiled
# extensions (`fused_softmax.py`, imported inside the kernels and `get_batch_per_block`); bias+activation and
# bias+dropout+add are plain torch functions under `megatron.core.jit.jit_fuser` = torch.compile, whose GPU kernels
# are Triton's.
FUSION_MODULES = {
    "masked_softmax_fusion": ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                              "scaled_softmax_cuda"),
    "bias_activation_fusion": ("triton",),
    "bias_dropout_fusion": ("triton",),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, or a build that fails to load (CUDA/ABI mismatch)
        return False
    return True


def fusion_flags(on_gpu: bool) -> dict[str, bool]:
    """megatron-core's fusion switches: on only on GPU (CPU runs unfused, as the CPU tests expect), and there only
    when the kernels each needs import, so a bare torch + megatron-core GPU box (no Apex) runs unfused softmax."""
    return {flag: on_gpu and all(_importable(m) for m in modules) for flag, modules in FUSION_MODULES.items()}


def _common(cfg: RunConfig, layout: ParallelLayout) -> dict:
    prec = cfg.precision
    dtype = params_dtype(cfg)
    on_gpu = torch.cuda.is_available()
    variable = cfg.rl.micro_batch_tokens > 0 and layout.pp > 1
    common = dict(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        # RL microbatches by token budget (rl.micro_batch_tokens) differ in shape: the pipeline sends shapes first
        variable_seq_lengths=variable,
        # megatron refuses variable lengths with its default MoE dispatcher even in a dense model; no MoE here
        **({"moe_token_dispatcher_type": "alltoall"} if variable else {}),
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **fusion_flags(on_gpu),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
    )
    if cfg.model.activation_recompute:
        common.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if prec.fp8 is not None:
        common.update(
            fp8=prec.fp8,
            fp8_recipe=prec.fp8_recipe,
            fp8_margin=prec.fp8_margin,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        )
    return common


def language_config(cfg: RunConfig, layout: ParallelLayout) -> TransformerConfig:
    """Qwen2.5: GQA with qkv bias, SwiGLU without bias, RMSNorm, RoPE."""
    lm = cfg.model.language
    extra = {}
    if layout.first_stage_layers is not None:
        extra["num_layers_in_first_pipeline_stage"] = layout.first_stage_layers
    return TransformerConfig(
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_attention_heads=lm.num_heads,
        num_query_groups=lm.num_kv_heads,
        kv_channels=lm.head_dim,
        add_qkv_bias=True,
        add_bias_linear=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        normalization="RMSNorm",
        layernorm_epsilon=lm.norm_eps,
        **extra,
        **_common(cfg, layout),
    )


def vision_config(cfg: RunConfig, layout: ParallelLayout) -> TransformerConfig:
    """InternViT: the megatron config its TP linears read (sizes use the padded head count)."""
    v = cfg.model.vision
    common = _common(cfg, layout)
    for key in ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len", "fp8_amax_compute_algo"):
        common.pop(key, None)  # the ViT runs in BF16: FP8 covers connector and decoder
    # Sequence parallelism is the decoder's alone: the ViT's activations are batch-first [tiles, tokens, hidden]
    # (megatron's SP gathers/scatters dim 0) and every TP rank needs all tiles' tokens for the splice.
    common.update(pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, sequence_parallel=False)
    return TransformerConfig(
        num_layers=v.num_layers,
        hidden_size=v.hidden_size,
        ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.padded_heads,
        kv_channels=v.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=v.norm_eps,
        **common,
    )


def connector_config(cfg: RunConfig, lm_config: TransformerConfig) -> TransformerConfig:
    """The decoder's config with the connector's LayerNorm (eps from model.connector). No sequence parallelism:
    the connector maps each tile's tokens (batch-first) before they are spliced into the decoder's sequence."""
    return dataclasses.replace(
        lm_config, normalization="LayerNorm", layernorm_epsilon=cfg.model.connector.norm_eps, num_layers=1,
        num_layers_in_first_pipeline_stage=None, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, sequence_parallel=False,
    )


def decoder_layer_spec(cfg: RunConfig) -> ModuleSpec:
    """TE layer spec (fused norms, FP8-capable GEMMs) when TE is used, else megatron-core's local spec with our
    RMSNorm (megatron's torch-norm wrapper refuses sequence parallelism; `models/norm.py`) and its attention extended
    to packed THD rows (`models/packing.py`; megatron's local attention refuses them)."""
    if use_transformer_engine(cfg):
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    norms = dict(input_layernorm=SpecRMSNorm, pre_mlp_layernorm=SpecRMSNorm)
    attn = spec.submodules.self_attention
    attn = dataclasses.replace(attn, submodules=dataclasses.replace(attn.submodules,
                                                                    core_attention=PackedDotProductAttention))
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn, **norms))


def decoder_block_spec(cfg: RunConfig, lm_config: TransformerConfig, vp_stage: int | None):
    """What GPTModel builds its decoder from: the TE layer spec as is (TE's final norm), or with the local spec the
    block's layers plus our RMSNorm as the final norm (megatron would pick its torch-norm wrapper there)."""
    spec = decoder_layer_spec(cfg)
    if use_transformer_engine(cfg):
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layers = get_num_layers_to_build(lm_config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=SpecRMSNorm)
