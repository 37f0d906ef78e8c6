"""GRPO's plumbing without vLLM: the rollout -> microbatch layout, DP sharding, the prompt sampler's resume, the
critical-token mask, and vocab-parallel entropy/logprobs at TP2 against full-vocabulary references."""

from __future__ import annotations

import pytest
import torch

from megatron_r1v3.metrics.entropy import critical_mask
from megatron_r1v3.parallel.spawn import run_distributed
from megatron_r1v3.rl.batch import Rollout, check_image_tokens, microbatch, sequence_length, shard_rows
from megatron_r1v3.rl.prompts import PromptSampler


def _rollout(prompt, response, step=3, index=0, adv=0.5):
    return Rollout(index, prompt, response, [-0.1 * (i + 1) for i in range(len(response))], 1.0, 1.0, 1.0,
                   "stop", step, advantage=adv, critical=[i == 1 for i in range(len(response))])


def test_microbatch_aligns_logprobs_masks_and_labels():
    r = _rollout([1, 5, 5, 7], [20, 21, 2])
    pix = {0: torch.ones(1, 3, 4, 4)}
    mb = microbatch([r, None], 8, 0, pix.get, step=3)
    assert mb["input_ids"][0].tolist() == [1, 5, 5, 7, 20, 21, 2, 0]
    assert mb["labels"][0].tolist()[:6] == [5, 5, 7, 20, 21, 2]
    # position t predicts token t+1: the 3 response tokens are predicted at positions 3, 4, 5
    assert mb["mask"][0].tolist() == [0, 0, 0, 1, 1, 1, 0, 0]
    assert torch.allclose(mb["old_logp"][0, 3:6], torch.tensor([-0.1, -0.2, -0.3]))
    assert mb["critical"][0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert mb["mask"][1].sum() == 0 and mb["adv"].tolist() == [0.5, 0.0] and mb["fresh"].tolist() == [1.0, 0.0]
    assert mb["pixel_values"].shape[0] == 1
    replayed = microbatch([r], 8, 0, pix.get, step=4)
    assert replayed["fresh"].tolist() == [0.0]  # an SSB replay is not this episode's rollout
    with pytest.raises(ValueError, match="prompt 0 has 7 tokens > seq_len 6"):
        microbatch([r], 6, 0, pix.get, step=3)


def test_image_token_count_check_names_the_prompt():
    r = _rollout([1, 5, 5, 7], [2], index=9)
    check_image_tokens(r, torch.zeros(1, 3, 4, 4), context_id=5, tokens_per_tile=2)
    with pytest.raises(ValueError, match="prompt 9: .* 2 image tokens but the trainer's tiling gives 4"):
        check_image_tokens(r, torch.zeros(2, 3, 4, 4), context_id=5, tokens_per_tile=2)


def test_shard_rows_pads_every_rank_to_the_same_microbatches():
    rows = list(range(7))
    shards = [shard_rows(rows, r, 2, 2) for r in range(2)]
    assert shards[0] == ([0, 1, 2, 3], 2) and shards[1] == ([4, 5, 6, None], 2)  # contiguous: groups stay whole
    assert sequence_length([_rollout([1] * 10, [2] * 3)]) == 16


def test_prompt_sampler_resumes_mid_epoch():
    a = PromptSampler(5, seed=3)
    first = a.take(3) + a.take(4)  # crosses into epoch 1
    assert sorted(first[:5]) == [0, 1, 2, 3, 4]
    b = PromptSampler(5, seed=3)
    b.take(3)
    state = b.state_dict()
    c = PromptSampler(5, seed=3)
    c.load_state_dict(state)
    assert c.take(4) == first[3:]
    with pytest.raises(ValueError, match="over 5 prompts with 6"):
        PromptSampler(6, seed=3).load_state_dict(state)


def test_easy_to_hard_curriculum_orders_every_epoch_and_names_a_record_without_difficulty():
    from megatron_r1v3.data.records import RecordError, Sample
    from megatron_r1v3.rl.prompts import difficulties

    levels = [3, 1, 2, 1, 3, 2, 1]
    sampler = PromptSampler(7, seed=5, difficulty=levels)
    for _ in range(2):  # every epoch climbs again: easy first, ties in a seeded shuffle
        epoch = sampler.take(7)
        assert sorted(epoch) == list(range(7)) and [levels[i] for i in epoch] == sorted(levels)
    orders = {tuple(PromptSampler(7, seed=s, difficulty=levels).take(3)) for s in range(6)}
    assert len(orders) > 1  # the easy prompts come in a seeded shuffle, not in file order
    samples = [Sample(question="q", answer="a", id="a1", meta={"difficulty": 2}),
               Sample(question="q", answer="a", id="a2", meta={"level": "3"})]
    assert difficulties(samples) == [2.0, 3.0]
    samples.append(Sample(question="q", answer="a", id="a3", meta={}, source="rl.jsonl:3"))
    with pytest.raises(RecordError, match="rl.jsonl:3.*a3 has None"):
        difficulties(samples)
    with pytest.raises(ValueError, match="2 difficulties for 3 prompts"):
        PromptSampler(3, seed=0, difficulty=[1, 2])


class _CharTokenizer:
    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_critical_mask_marks_word_starts_inside_think_only():
    tok = _CharTokenizer()
    text = "Hmm, so. Wait no, awaiting.</think>Wait \\boxed{1}"
    ids = [ord(c) for c in text]
    mask = critical_mask(tok, ids, ["wait", "hmm"])
    starts = [i for i, m in enumerate(mask) if m]
    assert starts == [0, text.index("Wait")]  # "awaiting" is not a word match; after </think> does not count
    assert critical_mask(tok, ids, []) == [False] * len(ids)


def test_vocab_parallel_entropy_and_logprobs_at_tp2():
    r = run_distributed("tests.rl.rl_workers:vocab_parallel_pieces", 2, timeout_s=120)
    for rank in r:
        assert rank["finite"], "padded -inf vocab rows produced NaN/inf"
        assert rank["entropy"] < 1e-5 and rank["logprob"] < 1e-5 and rank["grad"] < 1e-5, rank


def test_spearman_and_ranking_by_hand():
    from megatron_r1v3.rl.checkpoints import rank_checkpoints, spearman

    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 4], [1, 3, 2, 4]) == pytest.approx(0.9486833, abs=1e-6)  # ties get average ranks
    assert spearman([1, 1], [2, 3]) != spearman([1, 1], [2, 3])  # constant input: undefined (NaN)
    results = [{"checkpoint": c, "accuracy": a, "critical_entropy": h}
               for c, a, h in (("s1", 0.1, 0.5), ("s2", 0.3, float("nan")), ("s3", 0.2, 0.9))]
    high = rank_checkpoints(results)
    assert [r["checkpoint"] for r in high["ranking"]] == ["s3", "s1", "s2"] and high["best"] == "s3"
    assert high["spearman_vs_accuracy"] == pytest.approx(1.0)  # NaN entries left out of the correlation
    assert rank_checkpoints(results, prefer="low")["best"] == "s1"


def test_budget_slices_fill_each_microbatch_up_to_the_token_budget():
    from megatron_r1v3.rl.batch import budget_slices

    rows = [_rollout([1] * p, [2] * r) for p, r in ((10, 5), (10, 6), (10, 20), (10, 1), (40, 30), (3, 2))]
    # padded to 8: 16, 16, 32, 16, 72, 8 tokens
    got = budget_slices(rows, budget_tokens=64, multiple=8, max_rows=3)
    assert [(s.start, s.stop) for s in got] == [(0, 2), (2, 4), (4, 5), (5, 6)]  # 2x16, 2x32, 72 alone, 8
    assert [(s.start, s.stop) for s in budget_slices(rows[:4], 1000, 8, 3)] == [(0, 3), (3, 4)]  # max_rows
