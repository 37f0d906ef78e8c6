"""`init_parallel(cfg)`: starts this process's distributed runtime: launch environment, the run's checked layout
(`parallel.layout.plan_layout`), device, torch.distributed and megatron-core's groups, RNG seeds."""

from __future__ import annotations

import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_r1v3.config import RunConfig
from megatron_r1v3.parallel import setup_process
from megatron_r1v3.parallel.env import LaunchEnv, detect_launch_env
from megatron_r1v3.parallel.layout import ParallelLayout, plan_layout
from megatron_r1v3.parallel.phase import set_phase

_current: ParallelLayout | None = None


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
    """The layout this process runs in and its place in it; ranks are megatron-core's."""

    env: LaunchEnv
    backend: str
    device: torch.device
    layout: ParallelLayout
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def vpp(self) -> int | None:
        return self.layout.vpp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def compute_device() -> torch.device:
    """Where this rank computes: its CUDA device (set by `init_parallel`), or the CPU. Tensors handed to
    collectives are created here (NCCL refuses host tensors)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(cfg: RunConfig) -> ParallelState:
    """Start torch.distributed from torchrun/Slurm/single-process env, check cfg, build megatron groups, seed."""
    setup_process()
    set_phase("init_parallel: rendezvous")
    env = detect_launch_env(cfg.parallel.launcher)
    layout = plan_layout(cfg, env.world_size, te_available())
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
    return set_model_parallel(cfg, env, backend, layout)


def set_model_parallel(cfg: RunConfig, env: LaunchEnv | None = None, backend: str | None = None,
                       layout: ParallelLayout | None = None) -> ParallelState:
    """(Re)build megatron-core's TP/PP/VPP/CP/DP groups inside an existing process group and seed the RNGs."""
    global _current
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    set_phase("init_parallel: model-parallel groups")
    world = dist.get_world_size()
    layout = layout or plan_layout(cfg, world, te_available())
    layout.build_groups()
    _current = layout
    model_parallel_cuda_manual_seed(cfg.seed, force_reset_rng=True)
    torch.manual_seed(cfg.seed)
    env = env or LaunchEnv(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), "", 0, "existing")
    return ParallelState(
        env=env,
        backend=backend or dist.get_backend(),
        device=compute_device(),
        layout=layout,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def current_layout() -> ParallelLayout:
    """The layout of the groups `set_model_parallel` built last (what model builders read)."""
    if _current is None:
        raise RuntimeError("no parallel layout yet: call init_parallel(cfg) first")
    return _current


def destroy_parallel() -> None:
    """Tear down megatron groups and the process group (safe to call twice)."""
    global _current
    from megatron.core import parallel_state as ps

    _current = None

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
