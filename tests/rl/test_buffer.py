"""Selective sample buffer: what it keeps, when and how it replays, eviction, determinism, exact resume."""

import io

import pytest
import torch

from megatron_r1v3.rl.buffer import SelectiveSampleBuffer


def payloads(prefix, n):
    return [{"id": f"{prefix}{i}", "tokens": torch.arange(i + 1)} for i in range(n)]


def ids(items):
    return [p["id"] for p in items]


def test_keeps_only_non_zero_advantages():
    buf = SelectiveSampleBuffer()
    assert buf.add(payloads("a", 5), torch.tensor([0.0, 1.5, -0.7, 0.0, float("nan")]), step=0) == 2
    assert len(buf) == 2
    assert buf.stats(step=3) == {"ssb/size": 2.0, "ssb/weight_mean": pytest.approx(1.1), "ssb/age_mean": 3.0}
    with pytest.raises(ValueError):
        buf.add(payloads("b", 2), [1.0], step=0)


def test_fifo_eviction():
    buf = SelectiveSampleBuffer(capacity=3, max_age=None)
    buf.add(payloads("a", 2), [1.0, 1.0], step=0)
    buf.add(payloads("b", 2), [1.0, 1.0], step=1)
    assert len(buf) == 3
    assert sorted(ids(buf.sample(3))) == ["a1", "b0", "b1"]  # a0, the oldest, went first


def test_replay_only_above_threshold_and_within_budget():
    buf = SelectiveSampleBuffer(zero_variance_threshold=0.5, max_replay_fraction=0.25)
    buf.add(payloads("a", 20), [1.0] * 20, step=0)
    assert buf.replay(batch_size=32, num_informative=8, zero_variance_fraction=0.5, step=1) == []
    got = buf.replay(batch_size=32, num_informative=8, zero_variance_fraction=0.75, step=1)
    assert len(got) == 8  # 24 free slots, capped at 0.25 * 32
    assert len(set(ids(got))) == 8  # without replacement
    assert len(buf) == 12  # max_replays=1: replayed samples leave the buffer
    assert len(buf.replay(batch_size=32, num_informative=30, zero_variance_fraction=0.9, step=1)) == 2
    assert buf.replay_budget(batch_size=32, num_informative=0) == 8


def test_max_replays_keeps_samples_for_later():
    buf = SelectiveSampleBuffer(max_replays=2, max_age=None)
    buf.add(payloads("a", 2), [1.0, 1.0], step=0)
    assert len(buf.sample(2)) == 2 and len(buf) == 2
    assert len(buf.sample(2)) == 2 and len(buf) == 0


def test_stale_samples_are_evicted():
    buf = SelectiveSampleBuffer(max_age=2)
    buf.add(payloads("old", 3), [1.0] * 3, step=0)
    buf.add(payloads("new", 3), [1.0] * 3, step=2)
    got = buf.replay(batch_size=100, num_informative=0, zero_variance_fraction=1.0, step=3)
    assert sorted(ids(got)) == ["new0", "new1", "new2"]


def test_sampling_is_proportional_to_abs_advantage():
    buf = SelectiveSampleBuffer(capacity=10, max_replays=10**9, max_age=None, seed=1)
    buf.add([{"id": "big"}, {"id": "small"}], [-3.0, 1.0], step=0)
    first = [ids(buf.sample(1))[0] for _ in range(4000)]
    assert first.count("big") / len(first) == pytest.approx(0.75, abs=0.03)


def test_deterministic_given_seed():
    def draw(seed):
        buf = SelectiveSampleBuffer(seed=seed)
        buf.add(payloads("a", 50), torch.linspace(0.1, 2.0, 50), step=0)
        return ids(buf.sample(10))

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_state_dict_resumes_exactly():
    a = SelectiveSampleBuffer(capacity=40, max_replays=2, seed=3)
    a.add(payloads("a", 30), torch.linspace(-1.0, 2.0, 30), step=0)
    a.sample(5)
    blob = io.BytesIO()
    torch.save(a.state_dict(), blob)
    blob.seek(0)
    b = SelectiveSampleBuffer(capacity=40, max_replays=2, seed=999)
    b.load_state_dict(torch.load(blob, weights_only=False))
    for step in (1, 2):
        a.add(payloads(f"s{step}", 4), [1.0, -2.0, 0.5, 3.0], step=step)
        b.add(payloads(f"s{step}", 4), [1.0, -2.0, 0.5, 3.0], step=step)
        ra = a.replay(batch_size=16, num_informative=4, zero_variance_fraction=0.9, step=step)
        rb = b.replay(batch_size=16, num_informative=4, zero_variance_fraction=0.9, step=step)
        assert ids(ra) == ids(rb) and len(ra) == 4
    assert a.stats(step=2) == b.stats(step=2)


def test_bad_settings():
    for kwargs in ({"capacity": 0}, {"zero_variance_threshold": 1.5}, {"max_replays": 0}, {"min_abs_advantage": -1}):
        with pytest.raises(ValueError):
            SelectiveSampleBuffer(**kwargs)
