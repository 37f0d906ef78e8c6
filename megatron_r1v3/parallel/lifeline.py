"""A rank ends soon after its launcher: `watch_launcher()`, called where a process becomes a rank (`setup_process`).

Why: torchrun starts every worker in a session of its own (so that it can kill a worker's process group on a normal
shutdown). When torchrun itself is killed with SIGKILL (the OOM killer, `kill -9`, a node agent), nobody does that:
its workers are adopted by init and train on, holding memory, GPUs and the job's output pipes, and a requeued job
starts next to them. The parent of a rank is its launcher: torchrun (the `r1v3` command re-executes itself as
torchrun through `parallel/torchrun.py`, keeping its pid), the test launcher's forkserver (`parallel/spawn.py`; it
exits with the launcher), or slurmstepd under srun (srun's own death is handled by Slurm, which kills the step;
slurmstepd dying is the node agent's case).

How: a daemon thread polls `os.getppid()`; once the parent is gone it SIGKILLs the rank's process group (under
torchrun and the test launcher the rank leads one, holding the helpers it started: megatron dist_checkpointing's
writer manager, multiprocessing's resource tracker, other children such as vLLM's engine processes), else the
rank's descendants and itself. An uncaught error after the launcher is gone does the same at once (the excepthook):
the first rank to notice ends, and its peers' collectives fail before their own poll comes round.
`prctl(PR_SET_PDEATHSIG, SIGKILL)` alone was not enough: the kernel kills the rank at once, but its helpers are
orphaned in turn (measured: the dist_checkpointing manager and its resource tracker lived on), and a catchable
death signal runs its Python handler only between bytecodes of the main thread, i.e. not while the rank waits in a
collective. The thread needs the GIL for a moment, which CPU/GPU ops and collectives release.

The race where the launcher died before the watch started (during imports): the launcher's pid comes from
`R1V3_LAUNCHER_PID` (set by the `r1v3` relaunch and the test launcher); a parent that differs from it, while that
process is gone, means this rank was adopted already. Without the variable (a plain torchrun, srun) only a parent
that dies after the watch started is seen; a plain torchrun's rank that lost its launcher earlier fails at the
rendezvous, whose store that launcher hosted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from megatron_r1v3.parallel.env import under_launcher

LAUNCHER_PID = "R1V3_LAUNCHER_PID"
POLL_S = 0.5

_watching = False


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie (a killed launcher stays one until its own parent reaps it)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def launcher_pid(env=None) -> int | None:
    """The pid of this rank's launcher (its parent), or None when the launcher is already gone."""
    env = os.environ if env is None else env
    parent = os.getppid()
    named = int(env.get(LAUNCHER_PID) or 0)
    if named and named != parent:
        # started through something in between (a wrapper script) or the variable was inherited from an outer job:
        # our parent is the process to watch — unless the named launcher is dead and we were adopted already
        return parent if _alive(named) else None
    return parent  # (a parent of pid 1 may be a launcher running as a container's init: watched, not judged)


def _end_rank(launcher: int, error: BaseException | None = None) -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "?"))
    why = ""
    if error is not None:
        first = (str(error).strip().splitlines() or [""])[0][:300]
        why = f" (its own error, likely from a peer rank that ended with the launcher: {type(error).__name__}: {first})"
    # straight to fd 2, not through sys.stderr: the main thread may have swapped that for a buffer it prints later
    # (torch.distributed's excepthook does while it formats a failed collective's traceback), and this process is
    # SIGKILLed next, so a line written there would be lost (likely why a rank ended without a word in CI)
    os.write(2, f"[r1v3] rank {rank}: launcher (pid {launcher}) is gone; ending this rank and its helper "
                f"processes{why}\n".encode())
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)  # this rank and everything it started, at once
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(launcher: int, poll_s: float) -> None:
    while os.getppid() == launcher:
        time.sleep(poll_s)
    _end_rank(launcher)


def _ending_excepthook(launcher: int, previous):
    """An uncaught error in a rank whose launcher is gone ends the rank as the watch would, naming the error.
    Why: the rank whose watch fires first ends, and its peers' collectives fail at once ("Connection closed by
    peer"), usually before their own watch polls again: without this they print a peer's traceback instead of the
    cause, and exit through the normal path, which leaves the helpers of a rank that is no group leader behind.
    Installed before `init_process_group`, whose excepthook (rank prefix, stderr buffered) calls this one."""

    def hook(kind, value, tb):
        if os.getppid() != launcher:  # the kernel re-parents a rank the moment its launcher exits
            _end_rank(launcher, value)
        previous(kind, value, tb)

    return hook


def watch_launcher(poll_s: float = POLL_S) -> bool:
    """When this process is a rank (torchrun, srun, the test launcher): end it, with its helpers, soon after its
    launcher exits (at once if that happened already, or when the rank fails after it). Idempotent; returns whether
    a watch runs."""
    global _watching
    if _watching or under_launcher() is None:
        return _watching
    launcher = launcher_pid()
    if launcher is None:
        _end_rank(int(os.environ[LAUNCHER_PID]))
    sys.excepthook = _ending_excepthook(launcher, sys.excepthook)
    threading.Thread(target=_watch, args=(launcher, poll_s), name="r1v3-launcher-watch", daemon=True).start()
    _watching = True
    return True


@contextmanager
def preemption_signal_ignored() -> Iterator[None]:
    """Helper processes started inside ignore SIGUSR1, the preemption notice Slurm's `--signal=USR1@T` sends to every
    process of the job step: SIG_IGN survives fork and exec, a handler does not. The rank's own handler checkpoints
    and exits, then closes its helpers; a helper killed by the notice instead (multiprocessing's resource tracker, a
    reward-scoring pool worker) leaves the rank hanging at exit or its shared-memory names untracked."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGUSR1, previous)


def start_resource_tracker() -> None:
    """In a rank: multiprocessing's resource tracker (shared memory, spawned pools) started now, deaf to the
    preemption notice; it lives as long as the rank. Not in a launcher (the `r1v3` command execs into torchrun:
    a child started before would stay behind as the launcher's)."""
    from multiprocessing import resource_tracker

    if under_launcher() is None:
        return
    with preemption_signal_ignored():
        resource_tracker.ensure_running()
