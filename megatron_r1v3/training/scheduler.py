"""Learning-rate schedule: megatron-core's OptimizerParamScheduler (linear warmup, then cosine/linear/constant)."""

from __future__ import annotations

from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_r1v3.config import OptimizerConfig


def build_scheduler(optimizer, ocfg: OptimizerConfig, total_steps: int) -> OptimizerParamScheduler:
    """Warmup for `warmup_fraction` of `total_steps`, then decay to `min_lr` (R1V3 SFT: cosine, warmup 0.03)."""
    warmup = int(round(ocfg.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup else ocfg.lr,
        max_lr=ocfg.lr,
        min_lr=ocfg.min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, warmup + 1),
        lr_decay_style=ocfg.lr_decay_style,
        start_wd=ocfg.weight_decay,
        end_wd=ocfg.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
