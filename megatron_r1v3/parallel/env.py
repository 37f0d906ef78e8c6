"""Where this process sits: rank, world size and rendezvous address from torchrun or Slurm variables."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the job and how to reach rank 0."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | none


def first_host(nodelist: str) -> str:
    """First hostname of a Slurm nodelist: `gpu-[03-05,09],cpu1` -> `gpu-03`."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty SLURM_JOB_NODELIST")
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def free_port() -> int:
    """An unused TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def under_launcher(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """'torchrun' or 'slurm' when this process was started by one (one process per rank), else None."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    # SLURM_STEP_NUM_TASKS is set inside an srun step, not in the batch script that calls srun.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return "slurm"
    return None


def detect_launch_env(launcher: str = "auto", env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Read torchrun (`RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*`) or Slurm (`SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST`)."""
    env = os.environ if env is None else env
    kind = under_launcher(env) if launcher == "auto" else (None if launcher == "none" else launcher)
    if kind == "torchrun":
        return LaunchEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
        )
    if kind == "slurm":
        missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_NODELIST") if k not in env]
        if missing:
            raise RuntimeError(f"parallel.launcher=slurm but {', '.join(missing)} not set")
        job_id = int(env.get("SLURM_JOB_ID", "0") or 0)
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"]),
            master_port=int(env.get("MASTER_PORT") or 20000 + job_id % 20000),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "none")
