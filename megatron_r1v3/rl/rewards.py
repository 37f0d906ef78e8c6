"""R1V3 rewards (spec §3): `R = 0.8·R_acc + 0.2·R_format`, where R_acc is a rule check OR an optional verifier.

Rule check, on the last `\\boxed{…}` of the text after `</think>` (a box inside the thinking is a draft, not the
answer; a response that never closes `</think>` never answered, so it scores 0):
1. multiple choice (the truth is a letter A–H, or `mc_options` are given): compare option letters; "B", "(B)",
   "B.", "B. text" and the option's own text all name option B;
2. otherwise math-verify (symbolic / numeric equivalence: `\\frac{1}{2}` == `0.5`), wrapped so it never raises;
   when either side does not parse, or on any error or timeout, normalised string equality decides;
3. a normalised string match (data.answers.answers_match) always counts as correct.

math-verify times out with SIGALRM, which only works in the main thread: called from another thread the parse
runs without a timeout (run the scorer in worker processes if untrusted answers could hang sympy).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from math_verify import parse, verify
from math_verify.errors import TimeoutException

from megatron_r1v3.data.answers import answers_match, is_well_formed, last_boxed

log = logging.getLogger(__name__)

# (question, response, answer) -> True / False, or None to abstain; e.g. a served Qwen2.5-32B-Instruct judge.
Verifier = Callable[[str, str, str], bool | None]
# Options in letter order (A, B, …) or a letter -> text mapping.
Options = Sequence[str] | Mapping[str, str]

MATH_VERIFY_TIMEOUT_S = 5
_LETTERS = "ABCDEFGH"
_TRUTH_LETTER = re.compile(r"^\(?([A-H])\)?[.:]?$")  # upper case only: a lone "x" is a variable, not an option
_PRED_LETTER = re.compile(r"^\(?([A-Ha-h])\)?(?:[.:)]\s*(.*))?$", re.DOTALL)
_PLAIN_WORDS = re.compile(r"^[A-Za-z][A-Za-z\s'-]+$")  # math-verify reads "red" as r*e*d (== "der"): skip it


@dataclass(frozen=True)
class RewardBreakdown:
    """One response's reward: total = w_acc·accuracy + w_fmt·format; `prediction` is the extracted answer."""

    total: float
    accuracy: float
    format: float
    prediction: str | None = None


def final_answer(response: str) -> str | None:
    """The last `\\boxed{}` after `</think>`, or None (no `</think>`, or no box in the answer part)."""
    _, sep, tail = response.partition("</think>")
    return last_boxed(tail) if sep else None


def _strip_text(s: str) -> str:
    return re.sub(r"\\text\{([^}]*)\}", r"\1", s).strip()


def _options_map(options: Options | None) -> dict[str, str]:
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().strip("().").upper(): str(v) for k, v in options.items()}
    return {_LETTERS[i]: str(v) for i, v in enumerate(options[: len(_LETTERS)])}


def _letter_of_text(text: str, options: dict[str, str], timeout_s: int | None) -> str | None:
    """The unique option whose text equals `text` (string or math equivalence), else None."""
    hits = [k for k, v in options.items() if answers_match(text, v)]
    if not hits:
        hits = [k for k, v in options.items() if math_equivalent(text, v, timeout_s)]
    return hits[0] if len(hits) == 1 else None


def _truth_letter(answer: str, options: dict[str, str], timeout_s: int | None) -> str | None:
    m = _TRUTH_LETTER.match(_strip_text(answer))
    if m:
        return m.group(1)
    return _letter_of_text(answer, options, timeout_s) if options else None


def _predicted_letter(pred: str, options: dict[str, str], timeout_s: int | None) -> str | None:
    m = _PRED_LETTER.match(_strip_text(pred))
    if m:
        letter, rest = m.group(1).upper(), (m.group(2) or "").strip()
        # "B. 42" must name option B with text 42 when options are known; a bare "b." is only a letter
        if not rest or not options or letter not in options or answers_match(rest, options[letter]):
            return letter
        return None
    return _letter_of_text(pred, options, timeout_s) if options else None


def math_equivalent(pred: str, truth: str, timeout_s: int | None = MATH_VERIFY_TIMEOUT_S) -> bool | None:
    """math-verify equivalence of two answer strings; None when either does not parse or anything fails.

    `timeout_s=None` runs math-verify without its own SIGALRM timer (for callers that hold their own)."""
    if _PLAIN_WORDS.match(pred.strip()) or _PLAIN_WORDS.match(truth.strip()):
        return None
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${truth}$", parsing_timeout=timeout)
        target = parse(f"${pred}$", parsing_timeout=timeout)
        if not gold or not target:
            return None
        return bool(verify(gold, target, timeout_seconds=timeout))
    except (Exception, TimeoutException) as err:  # TimeoutException is a BaseException
        log.debug("math-verify failed on %r vs %r: %r", pred, truth, err)
        return None


def answer_correct(pred: str | None, answer: str, mc_options: Options | None = None,
                   math_timeout_s: int | None = MATH_VERIFY_TIMEOUT_S) -> bool:
    """Rule check of an extracted answer against the reference (module docstring, steps 1–3)."""
    if pred is None:
        return False
    options = _options_map(mc_options)
    truth_letter = _truth_letter(answer, options, math_timeout_s)
    if truth_letter is not None:
        return _predicted_letter(pred, options, math_timeout_s) == truth_letter
    if answers_match(pred, answer):
        return True
    return bool(math_equivalent(pred, answer, math_timeout_s))


def accuracy_reward(response: str, answer: str, mc_options: Options | None = None) -> float:
    """1.0 when the final boxed answer (after `</think>`) matches the reference by the rule check, else 0.0."""
    return float(answer_correct(final_answer(response), answer, mc_options))


def format_reward(response: str) -> float:
    """1.0 for `…</think>answer` with a boxed answer (data.answers.is_well_formed), else 0.0."""
    return float(is_well_formed(response))


class VerifierError(RuntimeError):
    """The answer verifier raised: the run stops, naming the judge and the item. Counting a failed call as "no"
    trains on a different reward without saying so (a chat-template bug once failed every judge call, unseen)."""


def verifier_failure(verifier, question: str, answer: str, err: BaseException, where: str = "") -> VerifierError:
    """The error that names the judge (its repr: an `EngineVerifier` gives its model directory), where it ran, the
    item and the cause."""
    return VerifierError(f"answer verifier {verifier!r}{where} failed: {type(err).__name__}: {err} (item: question "
                         f"{question[:80]!r}, reference answer {answer[:80]!r})")


def ask_verifier(verifier: Verifier, question: str, response: str, answer: str) -> bool:
    """True only for a yes; a no or an abstention (None, anything else) leaves the rule result. Raises
    `VerifierError` if the verifier raises."""
    try:
        return verifier(question, response, answer) is True
    except Exception as err:
        raise verifier_failure(verifier, question, answer, err) from err


def r1v3_reward(
    response: str,
    answer: str,
    w_acc: float = 0.8,
    w_fmt: float = 0.2,
    verifier: Verifier | None = None,
    question: str = "",
    mc_options: Options | None = None,
) -> RewardBreakdown:
    """`w_acc·R_acc + w_fmt·R_format`; R_acc = rule OR verifier.

    The verifier is asked only when the rule says no and there is a boxed final answer (a truncated response is
    never rescued); None abstains, so the rule result stands; an exception from it stops the run (`VerifierError`).
    """
    pred = final_answer(response)
    acc = answer_correct(pred, answer, mc_options)
    if not acc and pred is not None and verifier is not None:
        acc = ask_verifier(verifier, question, response, answer)
    fmt = format_reward(response)
    accuracy = float(acc)
    return RewardBreakdown(w_acc * accuracy + w_fmt * fmt, accuracy, fmt, pred)


def score_batch(
    responses: Sequence[str],
    answers: Sequence[str],
    questions: Sequence[str] | None = None,
    mc_options: Sequence[Options | None] | None = None,
    w_acc: float = 0.8,
    w_fmt: float = 0.2,
    verifier: Verifier | None = None,
) -> list[RewardBreakdown]:
    """`r1v3_reward` over aligned lists (answers / questions / options repeated per response by the caller)."""
    n = len(responses)
    if len(answers) != n:
        raise ValueError(f"{n} responses but {len(answers)} answers")
    for name, seq in (("questions", questions), ("mc_options", mc_options)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{n} responses but {len(seq)} {name}")
    return [
        r1v3_reward(
            responses[i],
            answers[i],
            w_acc,
            w_fmt,
            verifier,
            questions[i] if questions is not None else "",
            mc_options[i] if mc_options is not None else None,
        )
        for i in range(n)
    ]


__all__ = [
    "MATH_VERIFY_TIMEOUT_S",
    "RewardBreakdown",
    "Verifier",
    "VerifierError",
    "accuracy_reward",
    "answer_correct",
    "ask_verifier",
    "final_answer",
    "format_reward",
    "math_equivalent",
    "r1v3_reward",
    "score_batch",
    "verifier_failure",
]
