"""Reading answers out of R1V3-format responses: the last `\\boxed{...}` (nested braces), format checks, and a
plain match (normalised strings, multiple-choice letters). The GRPO reward adds math-verify on top of this."""

from __future__ import annotations

import re

_MC_LETTER = re.compile(r"^\(?([A-Ha-h])\)?[.:]?$")
_BRACE = re.compile(r"\\boxed\{|\{|\}")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, or None.

    One pass over the text (a brace stack), so hostile responses (thousands of unclosed boxes in 100K characters)
    cost linear time: "last" is the completed box that starts last.
    """
    opens: list[int] = []  # content start of each open brace; -1 for a brace that is not a box's
    best = None
    for m in _BRACE.finditer(text):
        if m.group() == "}":
            if opens:
                start = opens.pop()
                if start >= 0 and (best is None or start > best[0]):
                    best = (start, m.start())
        else:
            opens.append(m.end() if m.group() != "{" else -1)
    return text[best[0] : best[1]].strip() if best else None


def is_well_formed(response: str) -> bool:
    """`…</think>` then a final answer with `\\boxed{}` (the prompt ends with the `<think>\\n` prefill)."""
    head, sep, tail = response.partition("</think>")
    return bool(sep) and "<think>" not in tail and "</think>" not in tail and last_boxed(tail) is not None \
        and bool(head.strip())


def normalise(answer: str) -> str:
    """Lower-case, strip spaces, `\\text{}` and trailing punctuation; a lone option letter -> the letter."""
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", answer).strip().strip(".").strip()
    m = _MC_LETTER.match(a)
    return m.group(1).upper() if m else re.sub(r"\s+", "", a.lower())


def answers_match(predicted: str | None, truth: str) -> bool:
    """String-level match after `normalise` (no symbolic math; see rl/rewards.py for math-verify)."""
    return predicted is not None and normalise(predicted) == normalise(truth)
