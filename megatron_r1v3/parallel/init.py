"""`init_parallel(cfg)`: the one place where processes, devices and megatron parallel groups are decided."""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1v3.config import RunConfig, validate
from megatron_r1v3.parallel.env import LaunchEnv, detect_launch_env
from megatron_r1v3.parallel.phase import set_phase


@functools.lru_cache(maxsize=1)
def te_available() -> bool:
    """True when Transformer Engine's PyTorch layers import (never on the CPU machines)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class ParallelState:
    """The layout this process runs in; ranks are megatron-core's."""

    env: LaunchEnv
    backend: str
    device: torch.device
    tp: int
    pp: int
    vpp: int | None
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(cfg: RunConfig) -> ParallelState:
    """Start torch.distributed from torchrun/Slurm/single-process env, validate cfg, build megatron groups, seed."""
    set_phase("init_parallel: rendezvous")
    env = detect_launch_env(cfg.parallel.launcher)
    validate(cfg, env.world_size, te_available())
    backend = _backend(cfg.parallel.backend)
    # megatron's TP communication/compute overlap relies on one hardware queue (set before the CUDA context).
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        )
    return set_model_parallel(cfg, env, backend)


def set_model_parallel(cfg: RunConfig, env: LaunchEnv | None = None, backend: str | None = None) -> ParallelState:
    """(Re)build megatron-core's TP/PP/VPP/CP/DP groups inside an existing process group and seed the RNGs."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    set_phase("init_parallel: model-parallel groups")
    world = dist.get_world_size()
    validate(cfg, world, te_available())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    p = cfg.parallel
    ps.initialize_model_parallel(
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline,
        context_parallel_size=p.context,
    )
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    torch.manual_seed(cfg.seed)
    env = env or LaunchEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), "", 0, "existing")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return ParallelState(
        env=env,
        backend=backend or dist.get_backend(),
        device=device,
        tp=p.tensor,
        pp=p.pipeline,
        vpp=p.virtual_pipeline,
        cp=p.context,
        dp=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_parallel() -> None:
    """Tear down megatron groups and the process group (safe to call twice)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except ValueError:  # an in-process vLLM engine's shutdown already released the default group's entry
            pass
