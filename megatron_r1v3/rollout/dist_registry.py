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
- the counter that names new groups (`_group_count`, also a module global): every rank of a world must create the
  same groups in the same order for their names to agree, so an engine on rank 0 alone must not move rank 0's
  count (the trainer's next `new_group` hung). Each registry counts for itself; engine registries count from
  2**20 up (and again from there after vLLM's teardown resets the count), so an engine group never takes a
  trainer group's name in the process-wide name map.

vLLM's parallel state is process-wide: a second in-process engine (the answer verifier beside the policy engine)
joins the groups the first one built. So every engine of a process uses the one `engine_registry()`; once vLLM
has torn its world down, that registry is empty again and the next engine builds a new one in it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

ENGINE_GROUPS_FROM = 2**20  # engine groups are named from here up; a trainer creates far fewer groups
_TABLES = ("_pg_map", "_pg_names", "_pg_group_ranks", "_pg_backend_config", "_tags_to_pg", "_pg_to_tag")


class DistRegistry:
    """One registry's state: its default group (a `_World`) and its group tables."""

    def __init__(self, first_group: int = ENGINE_GROUPS_FROM) -> None:
        import torch.distributed.distributed_c10d as c10d

        self.world = c10d._World()
        self.tables: dict[str, dict] = {name: {} for name in _TABLES}
        self.first_group = self.count = first_group

    @classmethod
    def current(cls) -> DistRegistry:
        """The registry torch uses now (its live objects, not copies)."""
        import torch.distributed.distributed_c10d as c10d

        reg = cls.__new__(cls)
        reg.world = c10d._world
        reg.tables = {name: getattr(c10d, name) for name in _TABLES}
        reg.first_group, reg.count = 0, c10d._group_count
        return reg

    def install(self) -> None:
        import torch.distributed.distributed_c10d as c10d

        c10d._world = self.world
        for name, table in self.tables.items():
            setattr(c10d, name, table)
        c10d._group_count = max(self.count, self.first_group)

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
    saved = DistRegistry.current()
    inside = registry if registry is not None else DistRegistry()
    inside.install()
    try:
        yield inside
    finally:
        now = DistRegistry.current()  # what the engine left (tables may have been rebound inside)
        inside.world, inside.tables, inside.count = now.world, now.tables, now.count
        saved.install()
        saved.register_names()
