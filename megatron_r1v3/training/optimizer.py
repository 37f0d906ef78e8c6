"""Megatron DDP wrapping and the megatron optimizer (distributed optimizer by default)."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer

from megatron_r1v3.config import RunConfig
from megatron_r1v3.models.specs import params_dtype


def wrap_ddp(chunks: list[torch.nn.Module], cfg: RunConfig) -> list[DistributedDataParallel]:
    """Wrap every model chunk in megatron DDP (contiguous fp32 grad buffers) and wire the schedule hooks."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=cfg.optimizer.overlap_grad_reduce,
        use_distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
    )
    wrapped = [
        DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config = chunks[0].config
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def build_optimizer(ddp_chunks: list[DistributedDataParallel], cfg: RunConfig):
    """megatron-core optimizer over all trainable params of this rank's chunks."""
    o = cfg.optimizer
    dtype = params_dtype(cfg)
    ocfg = MegatronOptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=o.use_distributed_optimizer,
    )
    return get_megatron_optimizer(ocfg, ddp_chunks)
