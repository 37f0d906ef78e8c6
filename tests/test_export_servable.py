"""`r1v3 convert megatron-to-hf` writes a complete, servable directory (issue 18) through the CLI: tokenizer with
the image tokens named from the model's ids, image processor config from the run's tiling, processor config, the
R1V3 chat template, generation config from the run's sampling defaults; what would leave it unservable (remote code
we cannot write) stops before converting, naming what to add, and leaves no output.
The checkpoint has a Qwen2.5-layout tokenizer (tests/qwen_tokenizer.py). Loading with AutoProcessor and vLLM,
logits and greedy tokens against Megatron: tests/rollout/test_export_vllm.py (needs torchvision / vLLM)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_r1v3.bridge.random_hf import write_random_hf_checkpoint
from megatron_r1v3.presets import tiny_qwen
from tests.qwen_tokenizer import qwen_tokenizer

pytestmark = pytest.mark.multiprocess


def r1v3(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_r1v3.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=400)


@pytest.fixture(scope="module")
def meg(tmp_path_factory):
    """A native HF checkpoint of tiny-qwen with the Qwen-layout tokenizer, converted to Megatron."""
    root = tmp_path_factory.mktemp("servable")
    hf = write_random_hf_checkpoint(root / "hf", tiny_qwen(), "native")
    tok = qwen_tokenizer(root / "tok")
    for f in tok.iterdir():
        shutil.copy2(f, hf / f.name)
    out = r1v3("convert", "hf-to-megatron", "--hf", hf, "--out", root / "meg")
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def test_export_writes_a_servable_directory_from_the_runs_config(meg, tmp_path):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  preset: tiny-qwen\n  vision:\n    head_pad_multiple: 8\n"  # as converted from HF
                      "data:\n  max_tiles: 6\nrl:\n  temperature: 0.6\n  top_p: 0.9\n")
    hf = tmp_path / "hf"
    out = r1v3("convert", "megatron-to-hf", "--megatron", meg / "meg", "--out", hf, "--config", recipe)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"from {recipe} (max_tiles 6, temperature 0.6, top_p 0.9)" in out.stdout, out.stdout
    gen = json.loads((hf / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["temperature"], gen["top_p"], gen["do_sample"]) == (151645, 0.6, 0.9, True)
    image = json.loads((hf / "preprocessor_config.json").read_text())
    assert (image["max_patches"], image["image_mean"], image["image_std"]) == (6, [0.485, 0.456, 0.406],
                                                                              [0.229, 0.224, 0.225])
    processor = json.loads((hf / "processor_config.json").read_text())
    assert processor["processor_class"] == "InternVLProcessor" and processor["image_seq_length"] == 4
    tok = AutoTokenizer.from_pretrained(str(hf))
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (151665, 151666, 151667)
    content = [{"type": "image"}, {"type": "text", "text": "What shape?"}]
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\n<IMG_CONTEXT>\nWhat shape?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    model, info = InternVLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not any(info.values()), info
    assert model.config.image_token_id == 151667 and model.config.text_config.vocab_size == 151674


def test_remote_layout_without_its_code_is_refused_naming_the_files(meg, tmp_path):
    out = r1v3("convert", "megatron-to-hf", "--megatron", meg / "meg", "--out", tmp_path / "remote", "--layout",
               "remote")
    assert out.returncode == 1
    assert "modeling_internvl_chat.py" in out.stderr and "--layout native" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "remote").exists() and not list(tmp_path.glob(".remote*"))  # nothing half-written
    weights_only = r1v3("convert", "megatron-to-hf", "--megatron", meg / "meg", "--out", tmp_path / "raw", "--layout",
                        "remote", "--weights-only")  # a conversion round trip, knowingly not servable
    assert weights_only.returncode == 0, weights_only.stderr[-3000:]
    assert (tmp_path / "raw" / "config.json").is_file() and not (tmp_path / "raw" / "processor_config.json").exists()

