"""Reward scoring that cannot stall or kill a GRPO step: a process pool, a time limit per item, hostile answers
scored 0 with the reason counted.

math-verify (sympy) can run for minutes on an adversarial answer (`9^{9^{9^9}}`, `(2^{2^{30}})!`), and its own
timeout only works in a main thread. Each item therefore runs in a pool worker's main thread under a SIGALRM
time limit, and the parent gives a whole batch a deadline: a worker stuck in C code past it is killed with its
pool (the pool is rebuilt on the next call) and its items score 0 as "timeout". Before any parsing, answers that
cannot be honest are refused: NUL bytes, or a final `\\boxed{}` longer than `MAX_ANSWER_CHARS`.

The optional LLM verifier (a second vLLM engine) stays in the parent: it is asked after the rule check, only for
items the rule marked wrong that have a boxed answer (as `rewards.r1v3_reward` does); a verifier error stops the
scoring (`rewards.VerifierError`, naming the judge and the item).
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from megatron_r1v3.parallel.lifeline import preemption_signal_ignored
from megatron_r1v3.rl.rewards import (
    MATH_VERIFY_TIMEOUT_S,
    Options,
    RewardBreakdown,
    Verifier,
    answer_correct,
    ask_verifier,
    final_answer,
    format_reward,
)

log = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 1000  # a boxed final answer longer than this is not an answer (math-verify on it can hang)
REASONS = ("scored", "no_answer", "nul_bytes", "answer_too_long", "timeout", "error")


class _ItemTimeout(BaseException):
    """Raised by SIGALRM inside a worker; a BaseException so math-verify's `except Exception` cannot swallow it."""


def _alarm(signum, frame):
    raise _ItemTimeout()


def score_item(response: str, answer: str, options: Options | None, w_acc: float, w_fmt: float,
               timeout_s: float) -> tuple[RewardBreakdown, str]:
    """Rule reward of one response and why it is what it is (one of REASONS); never raises.

    Runs under a SIGALRM limit of `timeout_s` when called from a main thread (every pool worker task is).
    """
    if "\x00" in response or "\x00" in answer:
        return RewardBreakdown(0.0, 0.0, 0.0, None), "nul_bytes"
    guarded = timeout_s > 0 and threading.current_thread() is threading.main_thread()
    if guarded:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        pred = final_answer(response)
        if pred is not None and len(pred) > MAX_ANSWER_CHARS:
            return RewardBreakdown(0.0, 0.0, 0.0, None), "answer_too_long"
        # math-verify's own SIGALRM timer would cancel ours: inside the guard it runs without one
        accuracy = float(answer_correct(pred, answer, options, None if guarded else MATH_VERIFY_TIMEOUT_S))
        fmt = format_reward(response)
        reason = "scored" if pred is not None else "no_answer"
        return RewardBreakdown(w_acc * accuracy + w_fmt * fmt, accuracy, fmt, pred), reason
    except _ItemTimeout:
        return RewardBreakdown(0.0, 0.0, 0.0, None), "timeout"
    except Exception as err:  # anything a hostile string provokes: zero, counted, logged
        log.warning("reward scoring failed (%s: %s); scored 0", type(err).__name__, err)
        return RewardBreakdown(0.0, 0.0, 0.0, None), "error"
    finally:
        if guarded:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _ignore_job_signals() -> None:
    """Pool worker initializer: a preemption notice (Slurm's `--signal=USR1` reaches every process of the step) or a
    Ctrl-C is the trainer's to handle; the trainer then closes the pool."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _score_chunk(items: list[tuple[str, str, Any]], w_acc: float, w_fmt: float, timeout_s: float):
    return [score_item(r, a, o, w_acc, w_fmt, timeout_s) for r, a, o in items]


def wants_verdict(score: RewardBreakdown) -> bool:
    """The verifier is asked only where the rule check said wrong on a boxed final answer (a response without one,
    or refused or timed out, has no prediction)."""
    return score.prediction is not None and score.accuracy == 0.0


def judged_correct(score: RewardBreakdown, w_acc: float) -> RewardBreakdown:
    """`score` after the verifier said yes: accuracy 1, its weight added to the total."""
    return RewardBreakdown(w_acc + score.total, 1.0, score.format, score.prediction)


class RewardScorer:
    """`score` = the R1V3 reward of each response, computed by `workers` processes (0: in this process), each item
    within `timeout_s`. `counts` accumulates REASONS over calls (the caller logs and resets it per step)."""

    def __init__(self, workers: int = 4, timeout_s: float = 10.0, w_acc: float = 0.8, w_fmt: float = 0.2,
                 verifier: Verifier | None = None, deadline_slack_s: float = 30.0):
        self.workers, self.timeout_s, self.w_acc, self.w_fmt = workers, timeout_s, w_acc, w_fmt
        self.deadline_slack_s = deadline_slack_s
        self.verifier = verifier
        self.counts: Counter[str] = Counter()
        self._pool = None

    def _get_pool(self):
        if self._pool is None:
            # spawn: the trainer holds process groups, vLLM and OpenMP threads that a fork must not copy
            with preemption_signal_ignored():  # no window before the initializer runs
                self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_ignore_job_signals)
        return self._pool

    def _kill_pool(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def _rule_scores(self, items: list[tuple[str, str, Any]]) -> list[tuple[RewardBreakdown, str]]:
        if self.workers <= 0 or len(items) <= 1:
            return _score_chunk(items, self.w_acc, self.w_fmt, self.timeout_s)
        pool = self._get_pool()
        size = max(1, math.ceil(len(items) / (4 * self.workers)))  # a few chunks per worker: balance vs overhead
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        jobs = [pool.apply_async(_score_chunk, (c, self.w_acc, self.w_fmt, self.timeout_s)) for c in chunks]
        # a worker honours the limit between bytecodes; C code (a huge integer power) can overrun it: the batch
        # gets the time the limits allow plus slack, then whatever is unfinished is killed and scored 0
        rounds = math.ceil(len(items) / self.workers) + 1
        deadline = time.monotonic() + self.timeout_s * rounds + self.deadline_slack_s
        out: list[tuple[RewardBreakdown, str]] = []
        stuck = False
        for chunk, job in zip(chunks, jobs):
            try:
                out += job.get(timeout=max(0.0, deadline - time.monotonic()))
            except mp.TimeoutError:
                stuck = True
                out += [(RewardBreakdown(0.0, 0.0, 0.0, None), "timeout")] * len(chunk)
        if stuck:
            log.warning("reward scoring overran its deadline; worker pool killed, unfinished items scored 0")
            self._kill_pool()
        return out

    def score(self, responses: Sequence[str], answers: Sequence[str], questions: Sequence[str] | None = None,
              options: Sequence[Options | None] | None = None) -> list[RewardBreakdown]:
        """Aligned lists in, one RewardBreakdown per response out; never raises on the responses' content."""
        n = len(responses)
        for name, seq in (("answers", answers), ("questions", questions), ("options", options)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{n} responses but {len(seq)} {name}")
        items = [(responses[i], answers[i], options[i] if options is not None else None) for i in range(n)]
        results = self._rule_scores(items)
        scores = []
        for i, (score, reason) in enumerate(results):
            self.counts[reason] += 1
            if self.verifier is not None and wants_verdict(score):
                question = questions[i] if questions is not None else ""
                if ask_verifier(self.verifier, question, responses[i], answers[i]):
                    score = judged_correct(score, self.w_acc)
            scores.append(score)
        return scores

    def take_counts(self) -> dict[str, int]:
        """The reason counts since the last call, then reset."""
        counts, self.counts = dict(self.counts), Counter()
        return counts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None
