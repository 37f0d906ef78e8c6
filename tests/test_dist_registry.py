"""An in-process vLLM engine's torch.distributed registry is its own (`rollout.dist_registry`): the engine building
its world and groups, then tearing them down the way vLLM's shutdown does (destroying its WORLD group), leaves the
trainer's default group, group tables, process-wide group names and group counter as they were (the counter:
names of later trainer groups must agree with ranks that started no engine). Before, the
tables were shared and the teardown emptied them: a trainer that had closed an engine could build no new group."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from megatron_r1v3.rollout.dist_registry import ENGINE_GROUPS_FROM, torch_distributed_registry


def test_an_engines_teardown_leaves_the_trainers_groups(tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'trainer'}", rank=0, world_size=1)
    try:
        trainer = dist.new_group([0])
        trainer_name, count = c10d._world.pg_names[trainer], c10d._world.group_count
        with torch_distributed_registry() as engine:
            assert not dist.is_initialized()  # vLLM finds no default group: it builds a world of its own
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'engine'}", rank=0, world_size=1)
            engine_group = dist.new_group([0])
            engine_name = c10d._world.pg_names[engine_group]
            assert trainer not in c10d._world.pg_map and engine_name != trainer_name
        assert dist.is_initialized() and engine_group not in c10d._world.pg_map
        # an engine on rank 0 alone must not move rank 0's count: the trainer's next group names would disagree
        assert c10d._world.group_count == count and int(engine_name) >= ENGINE_GROUPS_FROM
        with torch_distributed_registry(engine):  # RolloutEngine.close: vLLM's shutdown destroys its WORLD group
            assert engine_group in c10d._world.pg_map
            dist.destroy_process_group()
            assert not dist.is_initialized()
        assert dist.is_initialized() and trainer in c10d._world.pg_map
        assert c10d._resolve_process_group(trainer_name) is trainer  # the teardown unregistered every name
        later = dist.new_group([0])  # KeyError in new_group before
        assert c10d._world.pg_names[later] == str(count)  # named as on a rank that never started an engine
        with torch_distributed_registry(engine):  # the next engine of the process: names still clear of the trainer's
            dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'engine2'}", rank=0, world_size=1)
            assert int(c10d._world.pg_names[dist.new_group([0])]) >= ENGINE_GROUPS_FROM
            dist.destroy_process_group()
        assert c10d._resolve_process_group(c10d._world.pg_names[later]) is later
        t = torch.ones(1)
        dist.all_reduce(t, group=later)
        dist.all_reduce(t, group=trainer)
        dist.all_reduce(t)
        assert t.item() == 1.0
    finally:
        dist.destroy_process_group()
