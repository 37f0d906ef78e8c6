"""The optional LLM answer verifier (spec §3: "a rule check OR an LLM verifier, e.g. Qwen2.5-32B-Instruct"), served
by a second in-process vLLM engine beside the policy's: on the rollout rank (`rl.rollout_tp=0`), or on every rank of
each SPMD engine at the engine's TP (`rl.rollout_tp >= 1`). Off by default (`rl.verifier_model: null`).

`rl.rewards.r1v3_reward` asks it only when the rule check says no and the response has a boxed final answer; it
sees the question, the reference answer and the extracted final answer, and must reply yes or no (greedy, a few
tokens). Anything else abstains (the rule result stands); an error from the engine stops the run, naming it
(`rl.rewards.VerifierError`).
"""

from __future__ import annotations

import re
from pathlib import Path

from megatron_r1v3.data.answers import last_boxed

PROMPT = (
    "You check answers to exam questions.\n"
    "Question: {question}\n"
    "Reference answer: {answer}\n"
    "Student's final answer: {prediction}\n"
    "Does the student's final answer mean the same as the reference answer? Reply with yes or no."
)
_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_verdict(text: str) -> bool | None:
    """yes -> True, no -> False, anything else -> None (abstain)."""
    m = _YES_NO.match(text)
    return None if m is None else m.group(1).lower() == "yes"


class EngineVerifier:
    """A `rl.rewards.Verifier` backed by a vLLM engine over an HF chat model directory.

    With `world` (an `engine.EngineWorld`) it is one rank's part of a tensor-parallel judge beside that rank's SPMD
    policy engine: vLLM's parallel state is process-wide, so it joins the policy engine's groups (same ranks, same
    TP) and every rank of the engine must call `judge` with the same items (`rl.spmd_rollouts`)."""

    def __init__(self, model_dir: str | Path, max_model_len: int = 4096, max_tokens: int = 8, seed: int = 0,
                 kv_cache_mb: int = 256, gpu_memory_utilization: float = 0.2, dtype: str = "auto", world=None):
        from megatron_r1v3.rollout.engine import RolloutEngine

        # dtype: `rl.rollout_dtype` (auto = bf16 on GPU, fp32 on CPU)
        self.engine = RolloutEngine(model_dir, max_model_len=max_model_len, seed=seed, dtype=dtype,
                                    kv_cache_bytes=kv_cache_mb * 2**20, gpu_memory_utilization=gpu_memory_utilization,
                                    max_images_per_prompt=None, world=world)
        self.tokenizer = self.engine.tokenizer
        self.max_tokens = max_tokens
        self.model_dir = Path(model_dir)
        self.calls = 0

    def __repr__(self) -> str:
        return f"EngineVerifier({str(self.model_dir)!r})"

    def prompt_ids(self, question: str, response: str, answer: str) -> list[int]:
        text = PROMPT.format(question=question, answer=answer, prediction=last_boxed(response) or "")
        messages = [{"role": "user", "content": text}]
        if getattr(self.tokenizer, "chat_template", None):
            # rendered, then encoded: with tokenize=True newer transformers return a BatchEncoding, not ids
            rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer.encode(rendered, add_special_tokens=False))
        return list(self.tokenizer.encode(text))

    def __call__(self, question: str, response: str, answer: str) -> bool | None:
        return self.judge([(question, response, answer)])[0]

    def judge(self, items: list[tuple[str, str, str]]) -> list[bool | None]:
        """Verdicts of (question, response, answer) items, one greedy batch."""
        if not items:
            return []
        self.calls += len(items)
        out = self.engine.generate([(self.prompt_ids(*item), []) for item in items], n=1, temperature=0.0,
                                   max_tokens=self.max_tokens)
        return [parse_verdict(samples[0].text) for samples in out]

    def close(self) -> None:
        self.engine.close()
