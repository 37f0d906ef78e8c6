#!/usr/bin/env python
"""Serve an exported HF directory with vLLM the way a user would and answer image questions greedily: the
directory's own chat template renders the prompt (one `<IMG_CONTEXT>` per image, expanded by vLLM's processor), its
generation config stops at `<|im_end|>`. Needs vLLM (the vLLM venv on CPU).

    python tools/serve_check.py runs/demo/hf --data runs/demo/toy/val.jsonl [--n 1] [--max-tokens 96] [--json]

Prints `question -> answer` per item; with --json, one JSON line per item (prompt, generated ids and logprobs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def read_items(jsonl: str | Path, n: int) -> list[dict]:
    """The first `n` rows of a samples JSONL with their image paths resolved against the file's folder."""
    path = Path(jsonl)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:n]
    for row in rows:
        row["images"] = [str(path.parent / p) for p in row.get("images", [])]
    return rows


def saved_dtype(model_dir: str | Path) -> str:
    """The dtype the weights were saved in (config.json): vLLM's "auto" would serve float32 weights in bf16."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("dtype") or "auto"


def serve_answers(model_dir: str | Path, items: list[dict], max_tokens: int = 96,
                  dtype: str | None = None) -> list[dict]:
    """Greedy answers of vLLM's `LLM(model=model_dir)` (in `dtype`, default the saved one) to items `{images:
    [paths], question}`; per item the prompt text, vLLM's (expanded) prompt ids, the generated ids, their logprobs
    (raw logits) and text."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: seconds to start on CPU
    os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    llm = LLM(model=str(model_dir), dtype=dtype or saved_dtype(model_dir), max_model_len=2048, enforce_eager=True,
              kv_cache_memory_bytes=64 * 2**20,
              limit_mm_per_prompt={"image": max(1, max(len(i["images"]) for i in items))}, seed=0)
    requests, texts = [], []
    for item in items:
        content = [{"type": "image"} for _ in item["images"]] + [{"type": "text", "text": item["question"]}]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        images = [Image.open(p).convert("RGB") for p in item["images"]]
        requests.append({"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text})
        texts.append(text)
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0), use_tqdm=False)
    answers = []
    for text, o in zip(texts, outs):
        gen = o.outputs[0]
        logprobs = [step[t].logprob for step, t in zip(gen.logprobs or [], gen.token_ids)]
        answers.append({"prompt": text, "prompt_token_ids": list(o.prompt_token_ids), "token_ids": list(gen.token_ids),
                        "logprobs": logprobs, "text": gen.text, "finish_reason": gen.finish_reason})
    return answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--data", required=True, help="samples JSONL (images, question)")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dtype", default=None, help="vLLM dtype (default: the one config.json was saved in)")
    args = p.parse_args(argv)
    items = read_items(args.data, args.n)
    for item, answer in zip(items, serve_answers(args.model_dir, items, args.max_tokens, args.dtype)):
        if args.json:
            print(json.dumps(answer), flush=True)
        else:
            print(f"[serve] {args.model_dir} (vLLM, greedy) answers {item['question']!r} "
                  f"(reference {item.get('answer')!r}):\n{answer['text']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
