"""A torch.distributed registry of an in-process vLLM engine's own, apart from the trainer's.

An in-process vLLM joins whatever default process group exists; in a trainer rank that is the trainer's world
(4 ranks at TP2·PP2), and vLLM's own group set-up then waits for ranks that never start an engine. Inside
`torch_distributed_registry` vLLM sees a registry of its own instead: no default group (it builds its own world:
one rank, or the engine's ranks under the external launcher) and its own group tables; the trainer's come back
afterwards, so a trainer that initialises torch.distributed later is not blocked by vLLM's default group either.

torch keeps a registry in two places, and both must be kept apart, or closing an engine breaks the trainer:
- `distributed_c10d._world` holds only the default group; the tables every group lives in (`_pg_map`, `_pg_names`,
  ranks, backend configs, tags) are module globals, shared by every `_World`. vLLM's shutdown destroys its WORLD
  group, which clears those tables: with them shared, the trainer's groups were gone too (the next `new_group`
  failed with a KeyError, `destroy_process_group` with "Invalid process group").
- the C++ name -> group map (`_register_process_group`, read by functional collectives) is process-wide and
  cleared by the same teardown: the trainer's names are registered again when its registry comes back.
The group counter that names new groups stays shared and never goes back, so vLLM's and the trainer's groups
never share a name.

vLLM's parallel state is process-wide: a second in-process engine (the answer verifier beside the policy engine)
joins the groups the first one built. So every engine of a process uses the one `engine_registry()`; once vLLM
has torn its world down, that registry is empty again and the next engine builds a new one in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

_TABLES = ("_pg_map", "_pg_names", "_pg_group_ranks", "_pg_backend_config", "_tags_to_pg", "_pg_to_tag")


class DistRegistry:
    """One registry's state: its default group (a `_World`) and its group tables."""

    def __init__(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        self.world = c10d._World()
        self.tables: dict[str, dict] = {name: {} for name in _TABLES}

    @classmethod
    def current(cls) -> DistRegistry:
        """The registry torch uses now (its live objects, not copies)."""
        import torch.distributed.distributed_c10d as c10d

        reg = cls.__new__(cls)
        reg.world = c10d._world
        reg.tables = {name: getattr(c10d, name) for name in _TABLES}
        return reg

    def install(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        c10d._world = self.world
        for name, table in self.tables.items():
            setattr(c10d, name, table)

    def register_names(self) -> None:
        """Put this registry's groups back into torch's process-wide name map where a teardown removed them."""
        import torch.distributed.distributed_c10d as c10d

        for pg, name in self.tables["_pg_names"].items():
            try:
                c10d._resolve_process_group(name)
            except RuntimeError:
                c10d._register_process_group(name, pg)


_ENGINES: DistRegistry | None = None


def engine_registry() -> DistRegistry:
    """The registry of this process's in-process vLLM engines (created on first use)."""
    global _ENGINES
    if _ENGINES is None:
        _ENGINES = DistRegistry()
    return _ENGINES


@contextlib.contextmanager
def torch_distributed_registry(registry: DistRegistry | None = None) -> Iterator[DistRegistry]:
    """Swap torch.distributed's registry for `registry` (a fresh one by default) for the duration; yields it."""
    import torch.distributed.distributed_c10d as c10d

    saved, count = DistRegistry.current(), c10d._group_count
    inside = registry if registry is not None else DistRegistry()
    inside.install()
    try:
        yield inside
    finally:
        now = DistRegistry.current()  # tables may have been rebound inside: keep what the engine left
        inside.world, inside.tables = now.world, now.tables
        saved.install()
        c10d._group_count = max(count, c10d._group_count)
        saved.register_names()
