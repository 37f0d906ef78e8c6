"""`parallel.wait.compute_on_rank`: waiting ranks follow a generating rank's phase past the collective timeout, and
still fail within about that timeout, naming the rank and phase, when it dies or hangs."""

from __future__ import annotations

import re

import pytest
import torch.distributed as dist

from megatron_r1v3.parallel.env import free_port
from megatron_r1v3.parallel.spawn import DistributedFailure, run_distributed
from megatron_r1v3.parallel.wait import RankLost, _wait_done

pytestmark = [pytest.mark.multiprocess, pytest.mark.timing]

TIMEOUT_S = 5.0


def _waited(msg: str) -> float:
    return float(re.search(r"\[waited ([\d.]+)s\]", msg).group(1))


def test_waiting_rank_follows_a_phase_three_times_the_timeout():
    res = run_distributed("tests.wait_workers:long_phase", 2, timeout_s=120, collective_s=TIMEOUT_S,
                          work_s=3 * TIMEOUT_S)
    assert [r["out"] for r in res] == [{"rows": [0, 1, 2, 3, 4], "by": 0}] * 2
    assert res[1]["waited"] >= 3 * TIMEOUT_S


def test_dead_generating_rank_fails_the_waiter_within_the_timeout():
    with pytest.raises(DistributedFailure) as err:
        run_distributed("tests.wait_workers:generator_dies", 2, timeout_s=120, collective_s=TIMEOUT_S, src=0,
                        how="exit")
    msg = str(err.value)
    assert "rank 1 failed" in msg and "RankLost: rank 0 " in msg and "in phase 'rollout step 7'" in msg
    assert _waited(msg) < TIMEOUT_S + 4


def test_hung_generating_rank_fails_the_waiter_after_the_timeout():
    """Rank 1 generates and is stopped (alive, silent; rank 0's store still answers): the stale heartbeat decides."""
    with pytest.raises(DistributedFailure) as err:
        run_distributed("tests.wait_workers:generator_dies", 2, timeout_s=120, collective_s=TIMEOUT_S, src=1,
                        how="stop")
    msg = str(err.value)
    assert "rank 0 failed" in msg and "RankLost: rank 1 sent no heartbeat" in msg
    assert "in phase 'rollout step 7'" in msg
    assert TIMEOUT_S < _waited(msg) < TIMEOUT_S + 4


def test_failure_on_the_generating_rank_is_reported_to_the_waiter_at_once():
    store = dist.TCPStore("127.0.0.1", free_port(), is_master=True, wait_for_workers=False)
    store.set("k/done", "ValueError: no engine")
    with pytest.raises(RankLost, match="rank 0 failed in phase 'eval': ValueError: no engine"):
        _wait_done(store, "k", 0, "eval", timeout_s=60, poll=0.05)
