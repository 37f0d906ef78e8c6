"""Ranks fail together: a problem one rank found becomes the same exception on every rank.

Without this, the rank that raised leaves while the others wait in their next collective until the process-group
timeout (600 s by default), then fail with a gloo/NCCL error that names nothing. Call it at a point every rank
reaches, with what this rank found (None when nothing), before the next collective that depends on it.
"""

from __future__ import annotations

import torch.distributed as dist


def describe(exc: BaseException, own: type[BaseException]) -> str:
    """One line for an exception: the message of an `own` error, `Type: first line` of any other."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    return line if isinstance(exc, own) else f"{type(exc).__name__}: {line}"


def agree_on_errors(problem: BaseException | str | None, error: type[Exception]) -> None:
    """Collective over the world: when any rank passes a problem, every rank raises `error` listing each distinct
    problem once with the ranks that found it (chained to this rank's own exception, if it had one)."""
    text = describe(problem, error) if isinstance(problem, BaseException) else problem
    found = [text]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, text)
    if not any(found):
        return
    ranks: dict[str, list[int]] = {}
    for rank, msg in enumerate(found):
        if msg:
            ranks.setdefault(msg, []).append(rank)
    many = len(found) > 1
    parts = [msg + (f" (rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))})" if many else "")
             for msg, r in ranks.items()]
    raise error("; ".join(parts)) from (problem if isinstance(problem, BaseException) else None)
