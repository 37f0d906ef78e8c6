"""A tokenizer in the real Qwen2.5 / Skywork-R1V3 layout (tests/qwen_tokenizer.py: special tokens at 151643-151673,
vocab 151674, no named image tokens) against the data path and the one writer of servable model directories
(`rollout.hf_export`): the image tokens come from the model config's ids, not from tokenizer attributes. In-process,
no model. The runs (SFT, GRPO, eval, selection, export, serving) are in tests/rollout/test_export_vllm.py."""

from __future__ import annotations

import json

import pytest

from megatron_r1v3.data.template import (
    encode_sft_sample,
    expand_image_tokens,
    image_token_ids,
    render_prompt,
)
from megatron_r1v3.data.tokenizer import TokenizerError, check_special_ids, load_tokenizer
from megatron_r1v3.presets import tiny, tiny_qwen
from megatron_r1v3.rollout.hf_export import ServableError, ServingSettings, check_servable, write_serving_files
from tests.qwen_tokenizer import QWEN_VOCAB_SIZE, qwen_tokenizer


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return qwen_tokenizer(tmp_path_factory.getbasetemp() / "qwen-tokenizer-cache")


def test_the_fixture_has_the_real_qwen_layout(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == QWEN_VOCAB_SIZE == 151674
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                                     "<|fim_pad|>", "<|file_sep|>", "<img>", "</img>", "<IMG_CONTEXT>", "</box>"])
    assert ids == [151643, 151644, 151645, 151646, 151662, 151664, 151665, 151666, 151667, 151673]
    assert (tok.bos_token, tok.eos_token_id, tok.pad_token_id) == (None, 151645, 151643)
    text = "<|im_start|>user\nWhat colour is the circle? Größe 日本 \\boxed{A}<|im_end|>\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.decode([5000]) == "<|unused_5000|>"  # ids between the learned vocab and 151643 exist, unused
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and config["bos_token"] is None
    assert "extra_special_tokens" not in config and not any(k.endswith("image_token") for k in config)
    with pytest.raises(AttributeError):
        tok.start_image_token  # noqa: B018  (what InternVLProcessor reads: the real tokenizers do not declare it)


def test_model_ids_are_checked_against_the_tokenizer(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    check_special_ids(tok, tiny_qwen())
    with pytest.raises(TokenizerError, match="image_context_token_id=5 .*151667.*tokens > model.language.vocab_size"):
        check_special_ids(tok, tiny())


def test_training_samples_carry_the_real_ids(qwen_dir):
    tok = load_tokenizer(qwen_dir)
    ids = image_token_ids(tok)
    assert (ids.start, ids.end, ids.context) == (151665, 151666, 151667)
    s = encode_sft_sample(tok, "What colour is the circle?", "<think>\nred\n</think>\n\n\\boxed{red}", [2], 4, 512)
    x = s.input_ids.tolist()
    assert x[0] == 151644 and x[-1] == 151645 and s.n_image_tokens == 8
    start = x.index(151665)
    assert x[start:start + 10] == [151665] + [151667] * 8 + [151666]
    assert s.labels[s.loss_mask.bool()].tolist()[-1] == 151645  # the loss ends on <|im_end|>


def test_serving_files_take_the_image_tokens_from_the_model_ids(qwen_dir, tmp_path):
    from transformers import AutoTokenizer

    serving = ServingSettings(max_tiles=6, temperature=0.6, top_p=0.95)
    written = write_serving_files(tmp_path, tiny_qwen(), qwen_dir, serving)
    assert {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.jinja",
            "preprocessor_config.json", "processor_config.json", "generation_config.json"} <= set(written)
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # the vocabulary: the very bytes the trainer read
        assert (tmp_path / name).read_bytes() == (qwen_dir / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert (tok.start_image_token_id, tok.context_image_token_id, tok.video_token) == (151665, 151667, "<|video_pad|>")
    assert len(tok) == 151674
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat shape?<|im_end|>"
    assert tok.encode(text, add_special_tokens=False) == load_tokenizer(qwen_dir).encode(text, add_special_tokens=False)
    question = "What colour is the circle?"
    content = [{"type": "image"}, {"type": "text", "text": question}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
    # the processor expands the one <IMG_CONTEXT>: the result is the training prompt, slow-thinking prefill included
    assert expand_image_tokens(rendered, [3], 4) == expand_image_tokens(render_prompt(question, 1), [3], 4)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["temperature"], gen["top_p"]) == (151645, 151643, 0.6, 0.95)
    image = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (image["max_patches"], image["size"], image["crop_to_patches"]) == (6, {"height": 56, "width": 56}, True)
    assert json.loads((tmp_path / "processor_config.json").read_text())["image_seq_length"] == 4


def test_what_cannot_be_served_is_named_before_converting(qwen_dir, tmp_path):
    wrong = tiny_qwen()
    wrong.image_context_token_id = 151660
    with pytest.raises(TokenizerError, match="image_context_token_id=151660 but the tokenizer has 151667"):
        check_servable(wrong, qwen_dir, "native", tmp_path)
    with pytest.raises(ServableError, match="configuration_internvl_chat.py.*--layout native"):
        check_servable(tiny_qwen(), qwen_dir, "remote", tmp_path)
    with pytest.raises(ServableError, match="data.use_thumbnail=false"):
        write_serving_files(tmp_path, tiny_qwen(), qwen_dir, ServingSettings(use_thumbnail=False))


def test_remote_layout_gets_its_tiling_and_an_auto_map_naming_present_code(qwen_dir, tmp_path):
    import torch

    from megatron_r1v3.bridge.hf_io import hf_config_from_model
    from megatron_r1v3.rollout.hf_export import REMOTE_CODE_AUTO_MAP, REMOTE_CODE_FILES

    (tmp_path / "config.json").write_text(json.dumps(hf_config_from_model(tiny_qwen(), "remote", torch.float32)))
    with pytest.raises(ServableError, match="conversation.py"):
        write_serving_files(tmp_path, tiny_qwen(), qwen_dir, ServingSettings(max_tiles=6), "remote")
    for name in REMOTE_CODE_FILES:  # stand-ins for the checkpoint's own remote code (only their presence matters)
        (tmp_path / name).write_text("# remote code\n")
    write_serving_files(tmp_path, tiny_qwen(), qwen_dir, ServingSettings(max_tiles=6), "remote")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == REMOTE_CODE_AUTO_MAP and config["max_dynamic_patch"] == 6
    assert "'<image>\\n'" in (tmp_path / "chat_template.jinja").read_text()  # remote code replaces <image>
