"""Rank bodies for tests/test_wait.py (run through parallel.spawn.run_distributed): one rank "generates" for a long
time or dies while the other waits in `parallel.wait.compute_on_rank`. A plain gloo group (no megatron-core), set up
as `init_parallel` does it, so rank 0 hosts the store."""

from __future__ import annotations

import datetime
import os
import signal
import time


def _init(timeout_s: float):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                            rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                            timeout=datetime.timedelta(seconds=timeout_s))
    return dist


def long_phase(collective_s: float, work_s: float) -> dict:
    """Rank 0 works `work_s` (longer than the collective timeout `collective_s`) while alive; every rank gets the
    result, and a collective still works afterwards."""
    from megatron_r1v3.parallel.wait import compute_on_rank

    dist = _init(collective_s)

    def generate() -> dict:
        end = time.monotonic() + work_s
        while time.monotonic() < end:  # busy in Python, as a rollout loop is (the heartbeat thread must still run)
            sum(range(10_000))
        return {"rows": list(range(5)), "by": dist.get_rank()}

    t0 = time.monotonic()
    out = compute_on_rank(generate, "rollout step 1", collective_s)
    waited = time.monotonic() - t0
    dist.barrier()
    return {"out": out, "waited": waited}


def generator_dies(collective_s: float, src: int, how: str) -> None:
    """Rank `src` dies (`exit`) or hangs (`stop`: SIGSTOP, alive but silent) one second into the phase; the other
    rank must raise RankLost. The waiter appends how long it waited."""
    from megatron_r1v3.parallel.wait import RankLost, compute_on_rank

    _init(collective_s)

    def generate() -> None:
        time.sleep(1.0)
        if how == "exit":
            os._exit(0)  # exit code 0: the launcher keeps waiting, so the waiting rank's error is what it reports
        os.kill(os.getpid(), signal.SIGSTOP)

    t0 = time.monotonic()
    try:
        compute_on_rank(generate, "rollout step 7", collective_s, src=src)
    except RankLost as e:
        raise RankLost(f"{e} [waited {time.monotonic() - t0:.1f}s]") from e
