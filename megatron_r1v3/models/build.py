"""Build this rank's model chunks (one per virtual pipeline stage) for the layout in `megatron.core.parallel_state`."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter

import torch
from megatron.core import parallel_state as ps

from megatron_r1v3.config import RunConfig
from megatron_r1v3.models.specs import (
    connector_config,
    decoder_block_spec,
    language_config,
    use_transformer_engine,
    vision_config,
)
from megatron_r1v3.models.vlm import R1V3Model
from megatron_r1v3.parallel.init import current_layout
from megatron_r1v3.parallel.phase import set_phase


def build_model(cfg: RunConfig, meta: bool = False, init: bool = True) -> list[R1V3Model]:
    """One R1V3Model per virtual pipeline stage owned by this rank (a single chunk without VPP), for the layout
    `init_parallel` set up.

    `meta=True` builds on the meta device (parameter counts of the 38B preset in seconds); `init=False` skips
    megatron's weight initialisation when every weight is about to be loaded (conversion, resume).
    """
    set_phase("build_model")
    layout = current_layout()
    lm_cfg = language_config(cfg, layout)
    vit_cfg = vision_config(cfg, layout)
    if meta or not init:
        lm_cfg = dataclasses.replace(lm_cfg, perform_initialization=False,
                                     use_cpu_initialization=meta or lm_cfg.use_cpu_initialization)
        vit_cfg = dataclasses.replace(vit_cfg, perform_initialization=False,
                                      use_cpu_initialization=meta or vit_cfg.use_cpu_initialization)
    conn_cfg = connector_config(cfg, lm_cfg)
    use_te = use_transformer_engine(cfg)
    vocab = cfg.model.language.padded_vocab_size
    vpp = layout.vpp
    chunks = []
    with torch.device("meta") if meta else contextlib.nullcontext():
        for i in range(vpp or 1):
            vp_stage = i if vpp else None
            chunks.append(
                R1V3Model(
                    cfg.model, lm_cfg, vit_cfg, conn_cfg, decoder_block_spec(cfg, lm_cfg, vp_stage), vocab,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    vp_stage=vp_stage,
                    use_te=use_te,
                )
            )
    for chunk in chunks:
        mark_tensor_parallel_params(chunk)
    if torch.cuda.is_available() and not meta:
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    return chunks


def mark_tensor_parallel_params(module: torch.nn.Module) -> None:
    """Set megatron's `tensor_model_parallel/partition_dim` on every TP-sharded weight.

    megatron-core sets them only inside its weight-init functions, so a model built with init=False would look
    replicated to the bridge and the optimizer. Column-parallel and vocab-parallel weights split dim 0 (as do
    column-parallel biases, which megatron always marks), row-parallel weights dim 1.
    """
    from megatron.core.tensor_parallel import layers as tpl

    for m in module.modules():
        mode = getattr(m, "parallel_mode", None)  # Transformer Engine wrappers
        if isinstance(m, (tpl.ColumnParallelLinear, tpl.VocabParallelEmbedding)) or mode == "column":
            dim = 0
        elif isinstance(m, tpl.RowParallelLinear) or mode == "row":
            dim = 1
        else:
            continue
        weight = getattr(m, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and not hasattr(weight, "tensor_model_parallel"):
            tpl.set_tensor_model_parallel_attributes(weight, True, dim, 1)


def unwrap_model(module: torch.nn.Module) -> torch.nn.Module:
    """The R1V3Model inside megatron wrappers (DDP, Float16Module)."""
    while hasattr(module, "module"):
        module = module.module
    return module


def count_parameters(chunks: list[torch.nn.Module]) -> Counter:
    """Parameters per component (`vision_model`, `mlp1`, `language_model`) held by this rank."""
    counts: Counter = Counter()
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            counts[name.split(".", 1)[0]] += param.numel()
    return counts
