"""SPMD rollout engines (issue 14): training TP2·PP2 (4 gloo ranks) -> 2 vLLM engines × rollout TP2, started with
dummy weights, refit per engine rank, freeze-aware. One launch (`spmd_workers.spmd_engines`) checks everything;
the pure pieces (layout, refit plan) are checked without vLLM. Needs vLLM for the launch (docs/rollout.md)."""

from __future__ import annotations

import pytest
import torch

from megatron_r1v3.rollout.engine import llm_kwargs
from megatron_r1v3.rollout.engine_group import EngineLayout

try:
    import vllm  # noqa: F401

    _NO_VLLM = ""
except Exception as exc:  # ImportError, or a broken install
    _NO_VLLM = f"vLLM not importable ({type(exc).__name__}: {exc}); install it per docs/rollout.md"

FP32 = 1e-5


def test_engine_layout():
    layout = EngineLayout(world=8, tp=4, ranks_per_node=8)
    assert layout.engines == 2 and layout.ranks(1) == [4, 5, 6, 7] and layout.lead(1) == 4
    assert [layout.engine_of(r) for r in range(8)] == [0] * 4 + [1] * 4
    assert [layout.engine_rank(r) for r in (0, 5)] == [0, 1]
    assert [list(s) for s in EngineLayout(4, 2).shares(5)] == [[0, 1, 2], [3, 4]]
    assert [len(s) for s in EngineLayout(4, 1).shares(2)] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="rollout_tp=3 must be >= 1 and divide the world size 4"):
        EngineLayout(4, 3)
    with pytest.raises(ValueError, match="divide the ranks of a node"):
        EngineLayout(16, 16, ranks_per_node=8)


def test_rollout_tp_config_field():
    from megatron_r1v3.config import ConfigError, validate
    from megatron_r1v3.presets import load_config

    assert load_config(None, []).rl.rollout_tp == 0  # default: today's one engine on rank 0
    assert load_config("examples/r1v3_38b_grpo.yaml", []).rl.rollout_tp == 8
    with pytest.raises(ConfigError, match="rl.rollout_tp=-1"):
        validate(load_config(None, ["rl.rollout_tp=-1"]))


def test_llm_kwargs_tensor_parallel_and_dummy():
    kw = llm_kwargs("/m", on_gpu=True, max_model_len=64, tensor_parallel_size=8, load_format="dummy")
    assert kw["tensor_parallel_size"] == 8 and kw["distributed_executor_backend"] == "external_launcher"
    assert kw["load_format"] == "dummy" and kw["dtype"] == "bfloat16"
    assert "tensor_parallel_size" not in llm_kwargs("/m", on_gpu=False, max_model_len=64)


def test_freeze_aware_plan_carries_whole_trainable_groups():
    from megatron_r1v3.bridge.mapping import megatron_parameters
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rollout.spmd_refit import plan_refit

    model = load_config(None, ["model.preset=tiny"]).model
    entries = [(name, (4, 4), torch.float32, not name.startswith("vision_model."))
               for _, _, name in megatron_parameters(model)]
    full = plan_refit([entries], model, full=True)
    later = plan_refit([entries], model, full=False)
    assert len(full.carry) == len(entries) and full.skipped_tensors == 0
    assert not any(n.startswith("model.vision_tower.") for n in later.expected)
    assert any(n.startswith("model.multi_modal_projector.") for n in later.expected)
    assert later.skipped_tensors == sum(1 for e in entries if not e[3]) and later.skipped_bytes == 64 * \
        later.skipped_tensors
    # one trainable tensor inside a frozen layer brings its whole layer (vLLM reloads complete modules only)
    one = [(n, s, d, t or n.startswith("vision_model.encoder.layers.0.mlp.fc1.bias")) for n, s, d, t in entries]
    plan = plan_refit([one], model, full=False)
    layer0 = [n for n in full.expected if n.startswith("model.vision_tower.encoder.layer.0.")]
    assert layer0 and set(layer0) <= set(plan.expected)
    assert not any(n.startswith("model.vision_tower.encoder.layer.1.") for n in plan.expected)


@pytest.fixture(scope="module")
def spmd_run(four_rank_engines) -> list[dict]:
    """Each rank's SPMD results, from the 4-rank launch shared with test_vllm_refit.py (tests/rollout/conftest.py)."""
    return [r["spmd"] for r in four_rank_engines]


def _max_diff(a, b) -> float:
    return float((torch.tensor(a) - torch.tensor(b)).abs().max())


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_every_engine_matches_megatron_across_refits(spmd_run):
    r = spmd_run
    assert [x["engine"] for x in r] == [0, 0, 1, 1]
    assert "config.json" in r[0]["dir_files"] and not any(f.endswith(".safetensors") for f in r[0]["dir_files"])
    for rank, x in enumerate(r):
        before, d1, d2 = (_max_diff(x[k], x[m]) for k, m in (("before", "megatron_1"), ("after_1", "megatron_1"),
                                                              ("after_2", "megatron_2")))
        print(f"\nrank {rank} engine {x['engine']}: start {x['start_seconds']:.1f}s; max |logprob diff| refit 1 "
              f"{d1:.2e}, refit 2 {d2:.2e} (dummy weights {before:.2f}); first {x['first']}; second {x['second']}")
        assert before > 1e-2, "the engine did not start from dummy weights"
        assert d1 <= FP32 and d2 <= FP32
    assert _max_diff(r[0]["megatron_1"], r[0]["megatron_2"]) > 1e-2  # the weights did change between refits
    # per-rank slices: the decoder's split tensors arrive as each rank's own slice, everything else whole, so an
    # engine's two ranks together receive every whole tensor twice and every split tensor once
    sliced, first = r[0]["sliced_hf_bytes"], [x["first"] for x in r]
    assert all(x["sliced"] == r[0]["sliced"] > 0 for x in r) and sliced > 0
    for a, b in ((0, 1), (2, 3)):
        assert first[a]["bytes"] == first[b]["bytes"]
        assert first[a]["received_bytes"] + first[b]["received_bytes"] == 2 * first[a]["bytes"] - sliced
    print(f"\nfirst refit: each engine rank received {first[0]['received_bytes']} and {first[1]['received_bytes']} "
          f"of {first[0]['bytes']} bytes (split tensors: {sliced} bytes)")
    assert r[0]["events"] == ["sleep(1)", "wake_up(weights)", "wake_up(kv_cache)"]


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_frozen_vit_second_refit_carries_only_trainable(spmd_run):
    for x in spmd_run:
        first, second = x["first"], x["second"]
        assert first["skipped_tensors"] == 0 and second["skipped_tensors"] > 0
        assert second["bytes"] + second["skipped_bytes"] >= first["bytes"] * 0.99
        assert not any(n.startswith("model.vision_tower.") for n in x["second_names"])
        assert second["tensors"] == len(x["second_names"]) < first["tensors"]
    s = spmd_run[0]
    print(f"\nsecond refit: {s['second']['tensors']} of {s['first']['tensors']} tensors, "
          f"{s['second']['bytes']} of {s['first']['bytes']} bytes ({s['second']['bytes'] / s['first']['bytes']:.3f})")


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_fault_on_one_engine_rank_stops_every_rank_naming_it(spmd_run):
    from tests.rollout.spmd_workers import DROPPED, DUPLICATED

    msgs = {x["faulty"] for x in spmd_run}
    assert len(msgs) == 1, msgs
    msg = msgs.pop()
    assert DROPPED in msg and "missing" in msg and "rank 3" in msg and "engine 1" in msg
    assert DUPLICATED in msg and "twice" in msg and "rank 0" in msg


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_episode_split_across_engines(spmd_run):
    r = spmd_run
    assert all(x["split_counts"] == [3, 2] for x in r)
    for key in ("split_tokens", "split_logprobs", "split_rewards"):
        assert all(x[key] == r[0][key] for x in r), key  # every rank sees the whole episode
    assert r[0]["split_tokens"] == r[0]["own_tokens"]  # splitting does not change a prompt's samples
    assert all(len(g) == 2 for g in r[0]["split_tokens"]) and len(r[0]["split_rewards"]) == 5


def test_ipc_bucket_pack_unpack_round_trip():
    from megatron_r1v3.rollout.ipc import pack_bucket, share_handle, unpack_bucket

    bucket = [("a", torch.arange(7, dtype=torch.float32).view(7, 1)), ("b", torch.ones(3, 5, dtype=torch.bfloat16)),
              ("c", torch.tensor([1, 2, 3], dtype=torch.int64))]
    buffer, layout = pack_bucket(bucket)
    assert [e[3] % 256 for e in layout.entries] == [0, 0, 0] and buffer.numel() >= layout.nbytes
    again, _ = pack_bucket(bucket, buffer)
    assert again is buffer  # reused
    for (n, t), (m, u) in zip(bucket, unpack_bucket(buffer, layout)):
        assert n == m and u.dtype == t.dtype and torch.equal(u, t)
    with pytest.raises(ValueError, match="CUDA buffer"):
        share_handle(buffer)


def test_launcher_env_is_the_engines_own_and_restored(monkeypatch):
    """Under torchrun, `env://` must not join the elastic agent's store (it would wait forever at the engine's port)."""
    import os

    from megatron_r1v3.rollout.engine import EngineWorld, launcher_env

    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with launcher_env(EngineWorld(rank=1, size=2, local_rank=5, master_addr="127.0.0.1", master_port=4321, tag="t")):
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "5")
        assert os.environ["MASTER_PORT"] == "4321" and os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "False"
    assert (os.environ["RANK"], os.environ["MASTER_PORT"], os.environ["TORCHELASTIC_USE_AGENT_STORE"]) == (
        "5", "29500", "True")
    assert "LOCAL_RANK" not in os.environ


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_verifier_engine_at_the_engines_tp_beside_each_spmd_engine(spmd_run):
    """rl.verifier_model with rl.rollout_tp=2: each engine's two ranks host a TP2 judge in the same processes,
    judge their own share's items in lockstep (same greedy tokens on both ranks), and every rank ends with every
    engine's verdicts applied alike; the policy engines sample as before beside it. A judge that raises stops the
    run naming itself, the engine, the rank and an item."""
    r = spmd_run
    assert all(x["judged"] == r[0]["judged"] for x in r)  # the whole episode's verdicts, on every rank
    assert [ik for ik, _ in r[0]["judged"]] == [[i, k] for i in range(5) for k in range(2)]  # engine 0's, then 1's
    assert all(x["judge_calls"] == 10 for x in r)  # the episode's items, each judged once by its own engine
    assert r[0]["judge_tokens"] == r[1]["judge_tokens"] and r[2]["judge_tokens"] == r[3]["judge_tokens"]
    for rank, x in enumerate(r):
        want = [[1.0 if v is True else 0.0 for (i, _), v in r[0]["judged"] if i == p] for p in range(5)]
        assert x["judged_accuracy"] == want  # a yes makes the answer correct, anything else leaves the rule's 0
        assert x["tokens_beside_judge"] == x["own_tokens"]
        assert x["yes_calls"] == 10  # a judge saying yes to all: every rank's every item becomes correct
        assert x["yes_scores"] == [[(1.0, 1.0)] * 2] * 5
        # a judge that raises stops the run on the SPMD path as on the rank-0 path, naming judge, engine, rank, item
        e = rank // 2
        assert x["down"] == (f"answer verifier Down() on engine {e}, rank {rank}, judging {[6, 4][e]} items (the first "
                             f"shown) failed: ConnectionError: judge unreachable (item: question "
                             f"'Question {[0, 3][e]}: what colour?', reference answer 'A')"), x["down"]
