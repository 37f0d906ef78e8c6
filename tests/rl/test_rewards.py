"""R1V3 rewards: answer extraction after `</think>`, letters, math-verify equivalence and its failure path."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from megatron_r1v3.rl import rewards
from megatron_r1v3.rl.rewards import (
    RewardBreakdown,
    VerifierError,
    accuracy_reward,
    final_answer,
    format_reward,
    math_equivalent,
    r1v3_reward,
    score_batch,
)


def resp(answer_part: str, think: str = "Let me think.") -> str:
    """A response after the `<think>\\n` prefill: reasoning, `</think>`, answer part."""
    return f"{think}\n</think>\n\n{answer_part}"


def test_nested_braces_are_extracted_whole():
    r = resp(r"The answer is \boxed{\frac{\sqrt{3}}{2}}.")
    assert final_answer(r) == r"\frac{\sqrt{3}}{2}"
    assert accuracy_reward(r, r"\frac{\sqrt{3}}{2}") == 1.0
    assert accuracy_reward(r, r"\frac{\sqrt{2}}{2}") == 0.0


def test_fraction_equals_decimal_via_math_verify():
    assert accuracy_reward(resp(r"\boxed{\frac{1}{2}}"), "0.5") == 1.0
    assert accuracy_reward(resp(r"\boxed{0.5}"), r"\dfrac{1}{2}") == 1.0
    assert accuracy_reward(resp(r"\boxed{2\sqrt{2}}"), r"\sqrt{8}") == 1.0
    assert accuracy_reward(resp(r"\boxed{0.6}"), r"\frac{1}{2}") == 0.0


def test_boxed_inside_think_is_ignored():
    r = resp("So the answer is 7.", think=r"Draft: \boxed{5}. Hmm, wait.")
    assert final_answer(r) is None
    assert accuracy_reward(r, "5") == 0.0
    assert accuracy_reward(resp(r"\boxed{7}", think=r"Draft: \boxed{5}"), "5") == 0.0


def test_missing_think_close_scores_zero():
    truncated = r"Let me think... the answer might be \boxed{3}"
    assert final_answer(truncated) is None
    assert accuracy_reward(truncated, "3") == 0.0
    assert format_reward(truncated) == 0.0
    b = r1v3_reward(truncated, "3")
    assert (b.total, b.accuracy, b.format) == (0.0, 0.0, 0.0)


def test_multiple_boxes_last_wins():
    r = resp(r"First \boxed{2}, no: \boxed{3}.")
    assert final_answer(r) == "3"
    assert accuracy_reward(r, "3") == 1.0
    assert accuracy_reward(r, "2") == 0.0


@pytest.mark.parametrize("pred", ["B", "(B)", "B.", "b", r"\text{B}", "B. 12"])
def test_letter_forms_match(pred):
    assert accuracy_reward(resp(rf"\boxed{{{pred}}}"), "B") == 1.0
    assert accuracy_reward(resp(rf"\boxed{{{pred}}}"), "C") == 0.0


def test_option_text_and_letters_with_options():
    options = ["10", "12", r"\frac{1}{2}", "none"]
    assert accuracy_reward(resp(r"\boxed{12}"), "B", options) == 1.0
    assert accuracy_reward(resp(r"\boxed{0.5}"), "C", options) == 1.0  # option text up to math equivalence
    assert accuracy_reward(resp(r"\boxed{10}"), "B", options) == 0.0
    assert accuracy_reward(resp(r"\boxed{B. 10}"), "B", options) == 0.0  # letter and text disagree
    assert accuracy_reward(resp(r"\boxed{B}"), "12", options) == 1.0  # truth given as option text
    assert accuracy_reward(resp(r"\boxed{B}"), "B", {"A": "1", "B": "2"}) == 1.0


def test_lowercase_truth_is_not_a_letter():
    assert accuracy_reward(resp(r"\boxed{x}"), "x") == 1.0
    assert accuracy_reward(resp(r"\boxed{B}"), "b") == 1.0  # string match still applies


def test_plain_words_use_string_match_only():
    assert accuracy_reward(resp(r"\boxed{Red}"), "red") == 1.0
    assert accuracy_reward(resp(r"\boxed{der}"), "red") == 0.0  # math-verify would read both as r*e*d
    assert math_equivalent("der", "red") is None


def test_math_verify_failure_falls_back_to_string(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("parser crashed")

    monkeypatch.setattr(rewards, "parse", boom)
    assert math_equivalent(r"\frac{1}{2}", "0.5") is None
    assert accuracy_reward(resp(r"\boxed{\frac{1}{2}}"), "0.5") == 0.0
    assert accuracy_reward(resp(r"\boxed{\frac{1}{2}}"), r"\frac{1}{2}") == 1.0


def test_math_verify_timeout_is_caught(monkeypatch):
    def slow(*args, **kwargs):
        raise rewards.TimeoutException("Operation timed out!")  # a BaseException in math-verify

    monkeypatch.setattr(rewards, "verify", slow)
    assert math_equivalent(r"\frac{1}{2}", "0.5") is None
    assert accuracy_reward(resp(r"\boxed{ 0.5 }"), "0.5") == 1.0


def test_unparseable_answer_is_not_an_error():
    assert not math_equivalent(r"\frac{", "}}")
    assert accuracy_reward(resp(r"\boxed{\frac{}"), "1") == 0.0


def test_works_off_the_main_thread():
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(accuracy_reward, resp(r"\boxed{\frac{1}{2}}"), "0.5").result() == 1.0


def test_format_reward():
    assert format_reward(resp(r"\boxed{1}")) == 1.0
    assert format_reward(resp("1")) == 0.0  # no box
    assert format_reward("</think>\\boxed{1}") == 0.0  # empty thinking
    assert format_reward(resp(r"<think>again</think>\boxed{1}")) == 0.0


def test_r1v3_weights_and_verifier():
    right, wrong_fmt = resp(r"\boxed{4}"), resp("4")
    assert r1v3_reward(right, "4") == RewardBreakdown(1.0, 1.0, 1.0, "4")
    assert r1v3_reward(resp(r"\boxed{5}"), "4").total == pytest.approx(0.2)
    assert r1v3_reward(wrong_fmt, "4").total == 0.0

    calls = []

    def judge(question, response, answer):
        calls.append(question)
        return True

    assert r1v3_reward(right, "4", verifier=judge).accuracy == 1.0
    assert calls == []  # the rule already said yes
    b = r1v3_reward(resp(r"\boxed{four}"), "4", verifier=judge, question="2+2?")
    assert (b.accuracy, b.total, calls) == (1.0, pytest.approx(1.0), ["2+2?"])
    assert r1v3_reward(wrong_fmt, "4", verifier=judge).accuracy == 0.0  # no boxed answer: never asked
    assert r1v3_reward(resp(r"\boxed{four}"), "4", verifier=lambda q, r, a: None).accuracy == 0.0

    def down(question, response, answer):
        raise ConnectionError("judge unreachable")

    # a failing judge stops the run, naming itself and the item (counting it as "no" changed the reward unseen)
    with pytest.raises(VerifierError, match=r"answer verifier <function .*down.*> failed: ConnectionError: judge "
                       r"unreachable \(item: question '2\+2\?', reference answer '4'\)"):
        r1v3_reward(resp(r"\boxed{four}"), "4", verifier=down, question="2+2?")
    assert r1v3_reward(wrong_fmt, "4", verifier=down).accuracy == 0.0  # never asked: nothing to fail
    assert r1v3_reward(right, "4", w_acc=0.5, w_fmt=0.5).total == 1.0


def test_score_batch():
    out = score_batch(
        [resp(r"\boxed{A}"), resp(r"\boxed{1/2}"), "no think"],
        ["A", "0.5", "1"],
        mc_options=[["x", "y"], None, None],
    )
    assert [b.total for b in out] == [pytest.approx(1.0), pytest.approx(1.0), 0.0]
    with pytest.raises(ValueError):
        score_batch(["a"], ["a", "b"])
