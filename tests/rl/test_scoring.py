"""Rewards that cannot stall or kill a step (issue 15): hostile answers score 0 with the reason counted, each item
runs under a time limit, the pool's batch deadline kills a worker that overruns, and honest answers score as the
plain rule check does."""

import time

import pytest

from megatron_r1v3.rl.rewards import VerifierError, r1v3_reward
from megatron_r1v3.rl.scoring import MAX_ANSWER_CHARS, RewardScorer, score_item

OK = "I see it.\n</think>\n\nThe answer is \\boxed{\\frac{1}{2}}."
HOSTILE = {
    "unbalanced": ("hmm\n</think>\n\\boxed{\\frac{1}{2" + "{" * 5000, "no_answer"),
    "many_open_boxes": ("x\n</think>\n" + "\\boxed{" * 30000 + "1" * 70000, "no_answer"),
    "huge_box": ("x\n</think>\n\\boxed{" + "1+" * 50000 + "1}", "answer_too_long"),
    "nul": ("x\n</think>\n\\boxed{0.5\x00}", "nul_bytes"),
    "power_tower": ("x\n</think>\n\\boxed{9^{9^{9^{9}}}}", "timeout"),
}


def test_honest_answers_score_as_the_rule_check():
    for response, answer in ((OK, "0.5"), (OK, "3"), ("no think \\boxed{0.5}", "0.5")):
        got, _ = score_item(response, answer, None, 0.8, 0.2, timeout_s=10)
        assert got == r1v3_reward(response, answer)


@pytest.mark.parametrize("case", sorted(HOSTILE))
@pytest.mark.timing
def test_hostile_answer_scores_zero_with_its_reason(case):
    response, reason = HOSTILE[case]
    t0 = time.perf_counter()
    got, why = score_item(response, "1", None, 0.8, 0.2, timeout_s=1.0)
    assert (got.total, got.accuracy, why) == (0.0, 0.0, reason)
    assert time.perf_counter() - t0 < 4.0  # the limit (1 s) holds, far below math-verify's own 5 s
    assert len("1+" * 50000) > MAX_ANSWER_CHARS


@pytest.mark.timing
def test_pool_scores_a_batch_in_order_and_counts_reasons():
    responses = [OK, HOSTILE["nul"][0], OK, HOSTILE["power_tower"][0], HOSTILE["huge_box"][0], OK]
    answers = ["0.5", "0.5", "7", "1", "1", "\\frac{2}{4}"]
    scorer = RewardScorer(workers=2, timeout_s=1.0)
    try:
        got = scorer.score(responses, answers, options=[None] * 6)
        assert [s.accuracy for s in got] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert [s.total for s in got] == pytest.approx([1.0, 0.0, 0.2, 0.0, 0.0, 1.0])
        assert scorer.take_counts() == {"scored": 3, "nul_bytes": 1, "timeout": 1, "answer_too_long": 1}
        assert scorer.take_counts() == {}
    finally:
        scorer.close()


@pytest.mark.timing
def test_a_worker_past_the_batch_deadline_is_killed_and_the_pool_rebuilt():
    """No in-worker limit (timeout_s=0: math-verify's own 5 s timer runs) and a 1 s batch deadline: the stuck
    worker is killed, its item scores 0 as "timeout", and the next batch runs on a fresh pool."""
    scorer = RewardScorer(workers=1, timeout_s=0.0, deadline_slack_s=1.0)
    try:
        t0 = time.perf_counter()
        got = scorer.score([HOSTILE["power_tower"][0], OK], ["1", "0.5"])
        assert time.perf_counter() - t0 < 4.5 and [s.total for s in got] == [0.0, 0.0]
        assert scorer.take_counts() == {"timeout": 2} and scorer._pool is None
        scorer.deadline_slack_s = 60.0
        assert [s.accuracy for s in scorer.score([OK, OK], ["0.5", "2"])] == [1.0, 0.0]
    finally:
        scorer.close()


def test_verifier_is_asked_only_for_wrong_boxed_answers_and_its_failure_stops_naming_the_item():
    asked = []

    def judge(question, response, answer):
        asked.append(answer)
        if answer == "boom":
            raise RuntimeError("judge down")
        return None if answer == "abstain" else True

    scorer = RewardScorer(workers=0, verifier=judge)
    got = scorer.score([OK, OK, "no box</think>", OK], ["0.5", "one half", "0.5", "abstain"])
    assert asked == ["one half", "abstain"]
    assert [s.accuracy for s in got] == [1.0, 1.0, 0.0, 0.0]  # an abstention keeps the rule's result
    assert [s.total for s in got] == pytest.approx([1.0, 1.0, 0.0, 0.2])
    with pytest.raises(VerifierError, match=r"failed: RuntimeError: judge down \(item: question 'q1', reference "
                       r"answer 'boom'\)"):
        scorer.score([OK, OK], ["0.5", "boom"], questions=["q0", "q1"])
