"""The optional LLM verifier: a second in-process vLLM engine next to the policy's, asked only when the rule check
fails on a boxed answer; yes/no parsing. The judge here is the tiny random model, so only the plumbing and the
verdict contract are checked, not the judgement. Needs vLLM (the vLLM venv)."""

from __future__ import annotations

import pytest

from megatron_r1v3.rl.verifier import parse_verdict
from tests.rollout.test_vllm_refit import _NO_VLLM


def test_parse_verdict():
    assert parse_verdict("Yes, they match.") is True and parse_verdict(" no") is False
    assert parse_verdict("Maybe") is None and parse_verdict("") is None and parse_verdict("yesterday") is None


def two_engines_worker(workdir: str) -> dict:
    import torch

    from megatron_r1v3.data.tokenizer import toy_tokenizer
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.rewards import r1v3_reward
    from megatron_r1v3.rl.verifier import EngineVerifier
    from megatron_r1v3.rollout.engine import RolloutEngine
    from megatron_r1v3.rollout.hf_export import write_vllm_model_dir

    cfg = load_config(None, ["model.preset=tiny"])
    tok = toy_tokenizer(f"{workdir}/tok")
    model_dir = write_vllm_model_dir(f"{workdir}/m", cfg.model, tok, torch.float32, seed=3, max_tiles=4)
    policy = RolloutEngine(model_dir, max_model_len=256, kv_cache_bytes=32 * 2**20)
    judge = EngineVerifier(model_dir, max_model_len=512, kv_cache_mb=32)
    right = r1v3_reward("ok</think>\\boxed{4}", "4", verifier=judge)
    calls_after_right = judge.calls
    wrong = r1v3_reward("ok</think>\\boxed{5}", "4", verifier=judge, question="2+2?")
    unboxed = r1v3_reward("ok</think> five", "4", verifier=judge)
    # directly too: the chat prompt must encode to ids (with tokenize=True newer transformers return a BatchEncoding,
    # and every judge call failed that way, unseen while ask_verifier counted a judge error as "no")
    direct = judge.judge([("2+2?", "ok</think>\\boxed{5}", "4")])
    ids = judge.prompt_ids("2+2?", "ok</think>\\boxed{5}", "4")
    sample = policy.generate([(policy.tokenizer.encode("hello"), [])], n=1, max_tokens=4, seed=0)[0][0]
    out = {"right": right.accuracy, "calls_after_right": calls_after_right, "calls": judge.calls,
           "wrong_acc": wrong.accuracy, "unboxed_acc": unboxed.accuracy, "policy_tokens": len(sample.token_ids),
           "direct": direct, "ids_are_ints": bool(ids) and all(isinstance(t, int) for t in ids)}
    judge.close()
    policy.close()
    return out


@pytest.mark.multiprocess
@pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")
def test_verifier_engine_beside_the_policy_engine(four_rank_engines):
    r = four_rank_engines[0]["verifier"]  # rank 0 of the shared engine launch (tests/rollout/conftest.py)
    assert r["right"] == 1.0 and r["calls_after_right"] == 0  # the rule said yes: the judge is not asked
    assert r["calls"] == 2  # asked once for the boxed wrong answer (never without a boxed answer), once directly
    assert r["ids_are_ints"] and len(r["direct"]) == 1 and r["direct"][0] in (True, False, None)
    assert r["wrong_acc"] in (0.0, 1.0) and r["unboxed_acc"] == 0.0 and r["policy_tokens"] >= 1
