"""Run a function on N local processes (gloo/nccl rendezvous on loopback) with a hard deadline.

Used by the tests and tools: each rank records its phase (`set_phase`) in a file, so a run that exceeds its deadline
is killed and reported as "rank R timed out in phase P" instead of hanging CI; a rank that raises is reported with
its traceback; a rank that dies without a word is reported with its exit code and last phase. Ranks end when this
process does (`lifeline.py`), e.g. when CI kills the test run.

Ranks are forked from multiprocessing's forkserver, which imports what every rank imports (`parallel/preload.py`:
torch, and on CPU the shim, megatron-core and vLLM where installed) once per launching process: on the 2-core box a
4-rank launch is ready in 0.1 s instead of 9 s of imports (`spawn` where the platform has no forkserver). Each
rank starts from the launcher's environment at the call, as a spawned one would.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from megatron_r1v3.parallel.env import free_port
from megatron_r1v3.parallel.lifeline import LAUNCHER_PID


class DistributedFailure(RuntimeError):
    """A rank raised or died; the message names the rank and its phase."""


class DistributedTimeout(DistributedFailure):
    """The run exceeded its deadline; the message names every unfinished rank and its phase."""


def _resolve(target: str | Callable) -> Callable:
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


PRELOAD = "megatron_r1v3.parallel.preload"


def _context():
    """The forkserver context, its server preloading `PRELOAD` (once per launching process); spawn without one."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([PRELOAD])  # read when the server starts, at this process's first launch
    return ctx


def _leave_forkserver() -> None:
    """Close this rank's copy of the pipe whose other end tells the forkserver that its launcher is alive: with it
    dropped, the server (this rank's parent) exits the moment the launcher does, and the rank's `lifeline` watch
    sees its parent gone as under a direct launcher. (multiprocessing hands the pipe on so that a rank could use the
    same server; a rank that launches ranks gets a server of its own.)"""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _worker(target, rank, world, port, phase_dir, env, results, kwargs) -> None:
    _leave_forkserver()
    os.setpgrp()  # own process group: the launcher can kill helpers this rank spawns (dist_checkpointing's)
    os.environ.clear()  # the launcher's environment at the call (the forkserver's is from its first launch)
    os.environ.update(env)
    preloaded = sys.modules.get(PRELOAD)  # + what the preloaded imports set, unless the launcher set it
    for key, value in getattr(preloaded, "IMPORT_ENV", {}).items():
        os.environ.setdefault(key, value)
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), R1V3_PHASE_FILE=str(Path(phase_dir) / f"rank{rank}"),
    )
    from megatron_r1v3.parallel import setup_process

    setup_process()  # a rank: ends with this launcher; before the target's module can import megatron-core
    import torch

    from megatron_r1v3.parallel.phase import set_phase

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))

    set_phase("import")
    try:
        out = _resolve(target)(**kwargs)
        results.put((rank, "ok", out))
    except BaseException:  # report everything, including KeyboardInterrupt in a child
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass


def _kill_group(pid: int | None) -> None:
    """SIGKILL a rank and everything in its process group (no orphan may keep CI's pipes open)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _phase(phase_dir: str, rank: int) -> str:
    try:
        return (Path(phase_dir) / f"rank{rank}").read_text().split(" ", 1)[1]
    except (OSError, IndexError):
        return "not started"


def run_distributed(
    target: str | Callable,
    nprocs: int,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call `target(**kwargs)` on `nprocs` ranks; return each rank's result (index = rank).

    `target` is a picklable callable or "module:function". Raises DistributedTimeout / DistributedFailure.
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {}), LAUNCHER_PID: str(os.getpid())}
    with tempfile.TemporaryDirectory(prefix="r1v3-phase-") as phase_dir:
        procs = [
            ctx.Process(target=_worker, args=(target, r, nprocs, port, phase_dir, child_env, results, kwargs))
            for r in range(nprocs)
        ]
        for p in procs:
            p.start()
        outcome: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        try:
            while len(outcome) < nprocs:
                try:
                    rank, status, value = results.get(timeout=0.5)
                    outcome[rank] = (status, value)
                    if status == "error":
                        raise DistributedFailure(
                            f"rank {rank} failed in phase '{_phase(phase_dir, rank)}':\n{value}"
                        )
                    continue
                except queue.Empty:
                    pass
                for r, p in enumerate(procs):
                    if r not in outcome and not p.is_alive() and p.exitcode not in (0, None):
                        raise DistributedFailure(
                            f"rank {r} died (exit code {p.exitcode}) in phase '{_phase(phase_dir, r)}'"
                        )
                if time.monotonic() > deadline:
                    pending = [r for r in range(nprocs) if r not in outcome]
                    where = "; ".join(f"rank {r} in phase '{_phase(phase_dir, r)}'" for r in pending)
                    raise DistributedTimeout(f"timed out after {timeout_s:.0f}s: {where}")
        finally:
            grace = time.monotonic() + (30 if len(outcome) == nprocs else 0)
            for p in procs:
                p.join(timeout=max(0.0, grace - time.monotonic()))
            for p in procs:
                _kill_group(p.pid)
                p.join(timeout=10)
    return [outcome[r][1] for r in range(nprocs)]
