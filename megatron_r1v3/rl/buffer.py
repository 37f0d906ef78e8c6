"""R1V2's Selective Sample Buffer (spec §3): keep responses with a non-zero advantage and replay them, drawn with
probability ∝ |A|, in episodes where too many groups have zero advantage (all right or all wrong).

The buffer stores an opaque payload per sample (whatever the trainer needs to re-run the loss: prompt id, token ids,
the advantage, the logprobs of the policy that generated it, …) next to |A|. A replayed sample is off-policy by
`step − added_step` updates: its stored old logprobs make the PPO ratio account for that, and `max_age` bounds it.

Per-episode use (the batch is `batch_size` responses; zero-advantage responses add no policy gradient):
    adv, stats = group_advantages(rewards)
    replayed = buffer.replay(batch_size, num_informative, stats.zero_variance_fraction, step)  # before add()
    buffer.add(informative_payloads, their_advantages, step)
    train on the informative fresh samples + replayed

Defaults (no source states them, spec [U]): capacity 1024 samples (one R1V3 episode, 32 × 32), replay when more than
half of the groups have zero variance, replay at most a quarter of the batch, each sample at most once, samples
older than 8 steps dropped. Sampling is without replacement and deterministic given the buffer's torch.Generator,
whose state is part of `state_dict()` (exact resume). Payloads must be picklable / torch.save-able.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class BufferedSample:
    """One stored response: the caller's payload, its |A| (the replay weight), when it was added, replays so far."""

    payload: Any
    weight: float
    step: int
    uid: int
    replays: int = 0


class SelectiveSampleBuffer:
    """FIFO-evicting store of informative samples, replayed ∝ |A| when an episode has too few informative groups."""

    def __init__(
        self,
        capacity: int = 1024,
        zero_variance_threshold: float = 0.5,
        max_replay_fraction: float = 0.25,
        max_replays: int = 1,
        max_age: int | None = 8,
        min_abs_advantage: float = 0.0,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0.0 <= zero_variance_threshold <= 1.0 or not 0.0 <= max_replay_fraction <= 1.0:
            raise ValueError("zero_variance_threshold and max_replay_fraction must lie in [0, 1]")
        if min_abs_advantage < 0:
            raise ValueError(f"min_abs_advantage must be >= 0 (zero weights cannot be drawn), got {min_abs_advantage}")
        if max_replays < 1:
            raise ValueError(f"max_replays must be >= 1, got {max_replays}")
        self.capacity = capacity
        self.zero_variance_threshold = zero_variance_threshold
        self.max_replay_fraction = max_replay_fraction
        self.max_replays = max_replays
        self.max_age = max_age
        self.min_abs_advantage = min_abs_advantage
        self.generator = torch.Generator().manual_seed(seed)
        self._items: deque[BufferedSample] = deque()
        self._next_uid = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, payloads: Sequence[Any], advantages: Sequence[float] | torch.Tensor, step: int) -> int:
        """Store the samples with |A| > min_abs_advantage (oldest evicted past capacity); returns how many."""
        adv = torch.as_tensor(advantages, dtype=torch.float64).reshape(-1)
        if adv.numel() != len(payloads):
            raise ValueError(f"{len(payloads)} payloads but {adv.numel()} advantages")
        added = 0
        for payload, a in zip(payloads, adv.abs().tolist()):
            if a > self.min_abs_advantage and a == a:  # a == a drops NaN
                self._items.append(BufferedSample(payload, a, step, self._next_uid))
                self._next_uid += 1
                added += 1
        while len(self._items) > self.capacity:
            self._items.popleft()
        return added

    def evict_stale(self, step: int) -> int:
        """Drop samples older than `max_age` steps at `step`; returns how many."""
        if self.max_age is None:
            return 0
        before = len(self._items)
        self._items = deque(s for s in self._items if step - s.step <= self.max_age)
        return before - len(self._items)

    def should_replay(self, zero_variance_fraction: float) -> bool:
        """True when the episode's share of zero-variance groups exceeds the threshold."""
        return zero_variance_fraction > self.zero_variance_threshold

    def replay_budget(self, batch_size: int, num_informative: int) -> int:
        """How many replayed samples fit: the free slots, capped at max_replay_fraction · batch_size and the size."""
        free = max(batch_size - num_informative, 0)
        return min(free, int(self.max_replay_fraction * batch_size), len(self._items))

    def sample(self, n: int) -> list[Any]:
        """Draw n distinct payloads with probability ∝ |A| (without replacement), counting a replay for each."""
        n = min(n, len(self._items))
        if n <= 0:
            return []
        items = list(self._items)
        weights = torch.tensor([s.weight for s in items], dtype=torch.float64)
        picked = torch.multinomial(weights, n, replacement=False, generator=self.generator).tolist()
        out = []
        for i in picked:
            items[i].replays += 1
            out.append(items[i].payload)
        self._items = deque(s for s in self._items if s.replays < self.max_replays)
        return out

    def replay(self, batch_size: int, num_informative: int, zero_variance_fraction: float, step: int) -> list[Any]:
        """The replayed payloads for this episode (empty unless `should_replay`); stale samples are evicted first."""
        self.evict_stale(step)
        if not self.should_replay(zero_variance_fraction):
            return []
        return self.sample(self.replay_budget(batch_size, num_informative))

    def stats(self, step: int | None = None, prefix: str = "ssb/") -> dict[str, float]:
        """Size, mean |A| and (given the current step) mean age, for the logger."""
        n = len(self._items)
        out = {prefix + "size": float(n)}
        out[prefix + "weight_mean"] = sum(s.weight for s in self._items) / n if n else 0.0
        if step is not None:
            out[prefix + "age_mean"] = sum(step - s.step for s in self._items) / n if n else 0.0
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: samples in order, uid counter, generator state."""
        return {
            "items": [(s.payload, s.weight, s.step, s.uid, s.replays) for s in self._items],
            "next_uid": self._next_uid,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (the constructor's settings stay; excess beyond capacity is evicted)."""
        self._items = deque(BufferedSample(*fields) for fields in state["items"])
        while len(self._items) > self.capacity:
            self._items.popleft()
        self._next_uid = int(state["next_uid"])
        self.generator.set_state(state["generator"])
