"""A Qwen2.5 / Skywork-R1V3-layout tokenizer through the whole recipe, then the exported checkpoint served by other
tools. The tokenizer (tests/qwen_tokenizer.py) has the real special ids (151643-151673, vocab 151674) and, like
the real ones, declares no named image tokens. One chain: SFT (2 ranks) -> GRPO with real vLLM rollouts (2 steps,
held-out eval at start and end) -> eval -> select-checkpoint -> `r1v3 convert megatron-to-hf` of the GRPO checkpoint ->
(a) transformers' AutoProcessor + InternVLForConditionalGeneration: the chat template's image prompt is the
training prompt token for token and the logits equal Megatron's (fp32); (b) vLLM `LLM(model=dir)` greedy-decodes
the tokens Megatron's own greedy decoding produces for two image prompts. Needs vLLM (the vLLM venv)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.qwen_tokenizer import qwen_model_overrides, qwen_tokenizer
from tests.rollout.test_vllm_refit import _NO_VLLM
from tests.test_sft import run_to_end

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")]
CLI = [sys.executable, "-m", "megatron_r1v3.cli"]
QUIET = ["logging.tensorboard=false", "logging.progress=false"]
FP32 = 1e-5


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """SFT then GRPO (2 steps, a checkpoint each) of tiny-qwen with the Qwen-layout tokenizer."""
    root = tmp_path_factory.mktemp("qwen")
    tokenizer = qwen_tokenizer(root / "tok")
    model = qwen_model_overrides(tokenizer)
    data = [f"data.toy_dir={root / 'toy'}", "data.toy_train=64", "data.toy_val=16", *model, *QUIET]
    run_to_end([*CLI, "sft", "examples/tiny_cpu_sft.yaml", f"output_dir={root / 'sft'}", *data, "train.steps=2",
                "train.global_batch_size=4", "train.eval_every=0", "checkpoint.save_every=0",
                "train.heldout_samples=0"])
    rl = [*data, "rl.prompts_per_step=4", "rl.samples_per_prompt=4", "rl.eval_prompts=4", "rl.eval_samples=2",
          "train.micro_batch_size=4", "rl.max_response_tokens=24", "rl.length_schedule=[]"]
    run_to_end([*CLI, "rl", "examples/tiny_cpu_rl.yaml", f"output_dir={root / 'rl'}",
                f"checkpoint.load={root / 'sft' / 'checkpoints'}", *rl, "train.steps=2", "checkpoint.save_every=1",
                "rl.eval_every=0"])
    return {"root": root, "rl_args": rl, "tokenizer": tokenizer}


def benchmark_from_toy(toy: Path, out: Path, n: int, long_at: int) -> list[dict]:
    """The first `n` toy held-out records in the Hugging Face benchmark layout, written by pyarrow itself: the
    question stem without its options, `options` a list (or null), the answer as the letter (even rows) or as the
    option's text (odd rows), the image a `datasets` Image struct with the bytes embedded; plus one prompt over
    rl.max_prompt_tokens=256 at position `long_at`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_r1v3.data.benchmark import render_question

    rows = []
    for k, line in enumerate((toy / "val.jsonl").read_text().splitlines()[:n]):
        rec = json.loads(line)
        options = rec["meta"].get("options")
        stem = rec["question"].split("\nA. ")[0] if options else rec["question"]
        assert render_question(stem, options) == rec["question"]  # the benchmark prompt is the toy prompt
        answer = options["ABCD".index(rec["answer"])] if options and k % 2 else rec["answer"]
        rows.append({"id": rec["id"], "question": stem, "options": options, "answer": answer,
                     "image": {"bytes": (toy / rec["images"][0]).read_bytes(), "path": rec["images"][0]}})
    rows.insert(long_at, {**rows[0], "id": "long-one", "question": "Describe the image in detail. " * 60})
    schema = pa.schema([("id", pa.string()), ("question", pa.string()), ("options", pa.list_(pa.string())),
                        ("answer", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out)
    return rows


def test_grpo_eval_and_selection_run_with_a_qwen_layout_tokenizer(chain):
    """GRPO (2 steps, held-out eval at 0 and 2), `r1v3 eval` and `r1v3 select-checkpoint` with the real ids. The
    eval reads a benchmark Parquet holding the run's 4 held-out prompts and one over-long prompt (`--limit 5`): the
    same accuracy as the run's own final held-out evaluation, the long prompt skipped, counted and named, the
    engine's prompt lengths (vLLM's expansion of the image placeholders) equal to ours; selection with
    `--max-new-tokens 16` really samples at most 16 tokens."""
    from megatron_r1v3.data.tokenizer import load_tokenizer
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.prompts import load_prompts, prompt_tokens

    root = chain["root"]
    rows = [json.loads(x) for x in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["group"] == "rl"}
    heldout = {r["step"]: r for r in rows if r["group"] == "heldout"}
    assert sorted(train) == [1, 2] and sorted(heldout) == [0, 2], (sorted(train), sorted(heldout))
    error = max(r["rollout/prob_error"] for r in train.values())
    print(f"\nqwen-layout tokenizer: GRPO prob error {error:.6f}, reward {[r['reward/mean'] for r in train.values()]}")
    assert error < 1.001  # fp32: vLLM's logprobs over the 151674-token vocab are the trainer's
    model_dir = root / "rl" / "vllm_model"  # what the engine served: the tokenizer now names its image tokens
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (tok_cfg["start_image_token"], tok_cfg["context_image_token"]) == ("<img>", "<IMG_CONTEXT>")

    bench = root / "bench.parquet"
    benchmark_from_toy(root / "toy", bench, 4, long_at=3)
    out = run_to_end([*CLI, "eval", "examples/tiny_cpu_rl.yaml", *chain["rl_args"], "--checkpoint",
                      str(root / "rl" / "checkpoints"), "--data", str(bench), "--limit", "5", "--out",
                      str(root / "eval")])
    summary = json.loads((root / "eval" / "summary.json").read_text())
    assert summary["checkpoint"].endswith("step_00000002")
    assert summary["accuracy"] == heldout[2]["accuracy"], out  # same prompts, seeds and budget as the run's
    assert summary["prompts"] == 4 and summary["skipped_prompts"] == 1 and summary["max_new_tokens"] == 24
    assert [(s["id"], s["source"]) for s in summary["skipped"]] == [("long-one", f"{bench}:3")]
    assert summary["skipped"][0]["tokens"] > 256 and f"[eval] skipped long-one ({bench}:3)" in out, out
    items = [json.loads(x) for x in
             (root / "eval" / "items" / "step_00000002" / "step_000000.jsonl").read_text().splitlines()]
    assert len(items) == 4 and all(len(x["responses"]) == 2 for x in items)
    cfg = load_config("examples/tiny_cpu_rl.yaml", chain["rl_args"])
    tok = load_tokenizer(chain["tokenizer"])
    samples = [s for s in load_prompts([str(bench)], None, False) if s.id != "long-one"]
    assert [x["id"] for x in items] == [s.id for s in samples]
    ours = [prompt_tokens(s, tok, cfg.model, cfg.data.max_tiles) for s in samples]
    assert [x["prompt_tokens"] for x in items] == ours  # vLLM's expanded prompt, token for token in length

    sel_dir = root / "select"
    run_to_end([*CLI, "select-checkpoint", "examples/tiny_cpu_rl.yaml", *chain["rl_args"], "--checkpoints",
                str(root / "rl" / "checkpoints"), "--max-new-tokens", "16", "--words", "is,so", "--out",
                str(sel_dir)])
    sel = json.loads((sel_dir / "selection.json").read_text())
    assert sorted(Path(r["checkpoint"]).name for r in sel["ranking"]) == ["step_00000001", "step_00000002"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in sel["ranking"])
    ent = [r["critical_entropy"] for r in sel["ranking"] if r["critical_entropy"] == r["critical_entropy"]]
    assert ent == sorted(ent, reverse=True) and sel["best"] == sel["ranking"][0]["checkpoint"]
    assert (sel_dir / "best").read_text().strip() == sel["best"]
    print(f"response length at the 24-token budget {summary['response_length']:.1f}; at 16: "
          + ", ".join(f"{r['response_length']:.1f} (truncated {r['truncated']:.0%})" for r in sel["ranking"]))
    assert summary["response_length"] > 16  # the budget below is what limits
    for r in sel["ranking"]:
        assert r["max_new_tokens"] == 16 and r["response_length"] <= 16 and r["truncated"] > 0
        lengths = [n for line in (sel_dir / "items" / Path(r["checkpoint"]).name / "step_000000.jsonl")
                   .read_text().splitlines() for n in json.loads(line)["response_tokens"]]
        assert len(lengths) == 8 and max(lengths) <= 16


def megatron_reference(megatron_dir: str, hf_dir: str, inputs: str, items: list[dict], max_new_tokens: int,
                       out: str) -> dict:
    """One rank: the exported checkpoint's Megatron model (TP1) on the HF processor's inputs (logits saved to
    `out`), and greedy decoding of `items` from their training-form prompts, with each greedy token's logprob."""
    from PIL import Image

    from megatron_r1v3.bridge.convert import build_for_conversion, conversion_run_config, read_meta
    from megatron_r1v3.data.template import encode_prompt_for_training
    from megatron_r1v3.data.tokenizer import load_tokenizer
    from megatron_r1v3.models.weights import load_model
    from megatron_r1v3.rollout.hf_export import make_image_processor
    from megatron_r1v3.training.generate import greedy_generate
    from megatron_r1v3.training.step import forward_logits

    model = read_meta(megatron_dir)["model"]
    _, chunks = build_for_conversion(conversion_run_config(model, torch.float32, 1, 1, None))
    load_model(chunks, Path(megatron_dir) / "model")
    vocab = model.language.vocab_size

    def logits_of(ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
        t = torch.tensor([ids])
        batch = {"input_ids": t, "pixel_values": pixels, "labels": t, "loss_mask": torch.ones_like(t)}
        return forward_logits(chunks, [batch], vocab)[0][0].float()

    hf_inputs = torch.load(inputs)
    torch.save(logits_of(hf_inputs["input_ids"][0].tolist(), hf_inputs["pixel_values"]), out)
    tokenizer = load_tokenizer(hf_dir)
    max_tiles = json.loads((Path(hf_dir) / "preprocessor_config.json").read_text())["max_patches"]
    processor = make_image_processor(model, max_tiles)
    prompts, pixels = [], []
    for item in items:
        images = [Image.open(p).convert("RGB") for p in item["images"]]
        tiles = processor(images=images, return_tensors="pt")["pixel_values"].float()
        prompts.append(encode_prompt_for_training(tokenizer, item["question"], [tiles.shape[0]],
                                                  model.tokens_per_tile))
        pixels.append(tiles)
    new = greedy_generate(chunks, prompts, pixels, vocab, model.eos_token_id, model.pad_token_id, max_new_tokens)
    logprobs = []
    for prompt, tiles, tokens in zip(prompts, pixels, new):
        lp = torch.log_softmax(logits_of(prompt + tokens, tiles), -1)
        logprobs.append([float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)])
    return {"prompts": prompts, "tokens": new, "logprobs": logprobs}


def test_exported_checkpoint_serves_with_transformers_and_vllm(chain, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    from megatron_r1v3.parallel.spawn import run_distributed
    from tools.serve_check import read_items

    root = chain["root"]
    ckpt = root / "rl" / "checkpoints" / "step_00000002"
    hf = tmp_path / "hf"
    stdout = run_to_end([*CLI, "convert", "megatron-to-hf", "--megatron", str(ckpt), "--out", str(hf)])
    assert f"from {root / 'rl' / 'config.yaml'}" in stdout, stdout  # the run's tiling and sampling, found
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "processor_config.json", "generation_config.json"):
        assert (hf / name).is_file(), name
    gen = json.loads((hf / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 151645 and gen["temperature"] == 1.0
    assert json.loads((hf / "preprocessor_config.json").read_text())["max_patches"] == 4  # tiny_cpu_rl's max_tiles

    # (a) transformers: AutoProcessor renders and tiles the image prompt; logits equal Megatron's
    items = read_items(root / "toy" / "val.jsonl", 2)
    processor = AutoProcessor.from_pretrained(str(hf))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": items[0]["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n<think>\n"), text
    inputs = processor(text=text, images=[Image.open(items[0]["images"][0]).convert("RGB")], return_tensors="pt")
    model = InternVLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"]).logits[0].float()
    torch.save({"input_ids": inputs["input_ids"], "pixel_values": inputs["pixel_values"].float()},
               tmp_path / "inputs.pt")
    ref = run_distributed(f"{__name__}:megatron_reference", 1, timeout_s=600, megatron_dir=str(ckpt),
                          hf_dir=str(hf), inputs=str(tmp_path / "inputs.pt"), items=items, max_new_tokens=12,
                          out=str(tmp_path / "megatron_logits.pt"))[0]
    assert inputs["input_ids"][0].tolist() == ref["prompts"][0]  # chat template + processor = the training prompt
    diff = float((torch.load(tmp_path / "megatron_logits.pt") - hf_logits).abs().max())
    print(f"\nexported checkpoint: transformers vs Megatron max |logit diff| = {diff:.3g}")
    assert diff <= FP32

    # (b) vLLM serves the directory as a user would and decodes Megatron's greedy tokens
    served = subprocess.run([sys.executable, "tools/serve_check.py", str(hf), "--data", str(root / "toy" / "val.jsonl"),
                             "--n", "2", "--max-tokens", "12", "--json"], capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr[-4000:]
    answers = [json.loads(x) for x in served.stdout.splitlines() if x.startswith("{")]
    assert [a["prompt_token_ids"] for a in answers] == ref["prompts"]
    assert [a["token_ids"] for a in answers] == ref["tokens"], (answers, ref["tokens"])
    lp_diff = max(abs(a - b) for ans, ours in zip(answers, ref["logprobs"]) for a, b in zip(ans["logprobs"], ours))
    print(f"vLLM greedy = Megatron greedy for 2 image prompts: {ref['tokens']}; max |logprob diff| {lp_diff:.3g}")
    assert lp_diff <= 1e-4  # fp32 engine on the exported files vs the trainer's model
