"""One rank's long phase (GRPO's vLLM rollouts, held-out sampling) without tripping the collective timeout.

`parallel.timeout_s` bounds every torch.distributed collective, but a 38B rollout phase on rank 0 takes far longer,
so the other ranks must not wait for it inside a collective. `compute_on_rank` runs the phase on rank `src` while a
thread there bumps a heartbeat counter in the process group's store (the TCPStore every rank already talks to); the
other ranks poll the store for the phase's "done" key and give up, naming the rank and the phase, only when the
counter has not moved for `timeout_s` or the store stops answering (rank 0 hosts it under `init_parallel`). Once
the result is ready it goes out in one broadcast, which no longer waits for the phase.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from megatron_r1v3.parallel.phase import set_phase

T = TypeVar("T")
_calls = itertools.count()  # every rank calls compute_on_rank in the same order: the n-th call's keys match


class RankLost(RuntimeError):
    """The rank computing a phase's result died, hung, or raised; the message names the rank and the phase."""


def beat_seconds(timeout_s: float) -> float:
    """The heartbeat period: a tenth of the timeout, between 0.05 and 5 s."""
    return max(0.05, min(5.0, timeout_s / 10))


POLL_S = 0.5  # how often a waiting rank asks whether the result is ready (at most this much added per phase)


class _Heartbeat:
    """A daemon thread bumping `key` in `store` every `every` seconds while the phase runs."""

    def __init__(self, store, key: str, every: float):
        self._stop = threading.Event()
        self._args = (store, key, every)
        self._thread = threading.Thread(target=self._beat, daemon=True, name="r1v3-heartbeat")

    def _beat(self) -> None:
        store, key, every = self._args
        while not self._stop.wait(every):
            try:
                store.add(key, 1)
            except Exception:  # the store is gone: the waiters notice on their own
                return

    def __enter__(self) -> _Heartbeat:
        self._args[0].add(self._args[1], 1)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _wait_done(store, key: str, src: int, phase: str, timeout_s: float, poll: float) -> None:
    """Poll every `poll` seconds until `src` marks the phase done; RankLost when its heartbeat is older than
    `timeout_s`, the store stops answering, or `src` reports a failure."""
    beats, last = -1, time.monotonic()
    while True:
        try:
            if store.check([f"{key}/done"]):
                status = store.get(f"{key}/done").decode()
                break
            now_beats = store.add(f"{key}/beat", 0)
        except (RuntimeError, OSError) as e:  # torch's DistNetworkError / DistStoreError are RuntimeErrors
            raise RankLost(f"rank {src} is gone in phase '{phase}': the process group's store stopped answering"
                           f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
        now = time.monotonic()
        if now_beats != beats:
            beats, last = now_beats, now
        elif now - last > timeout_s:
            raise RankLost(f"rank {src} sent no heartbeat for {now - last:.0f}s (parallel.timeout_s={timeout_s:g})"
                           f" in phase '{phase}': dead or hung")
        time.sleep(poll)
    if status != "ok":
        raise RankLost(f"rank {src} failed in phase '{phase}': {status}")


def compute_on_rank(fn: Callable[[], T], phase: str, timeout_s: float, src: int = 0) -> T:
    """Collective: `fn()` on global rank `src` only, however long it takes; its (picklable) result on every rank.
    The other ranks wait while `src` beats and raise `RankLost` within about `timeout_s` of it dying or hanging
    (at once when `fn` raises there)."""
    set_phase(phase)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    store = dist.distributed_c10d._get_default_store()
    key = f"r1v3/wait/{next(_calls)}/{phase}"
    every = beat_seconds(timeout_s)
    result = None
    if dist.get_rank() == src:
        try:
            with _Heartbeat(store, f"{key}/beat", every):
                result = fn()
        except BaseException as e:
            try:
                store.set(f"{key}/done", f"{type(e).__name__}: {e}"[:1000])
            except Exception:
                pass  # the waiters fall back on the stale heartbeat
            raise
        store.set(f"{key}/done", "ok")
    else:
        _wait_done(store, key, src, phase, timeout_s, min(POLL_S, every))
    box = [result]
    dist.broadcast_object_list(box, src=src)
    return box[0]
