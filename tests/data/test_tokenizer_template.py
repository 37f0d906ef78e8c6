"""Toy tokenizer (fixed special ids, deterministic, AutoTokenizer round trip) and the R1V3 template: exact prompt
text, assistant-only loss mask, over-long samples refused, vLLM form == training form after expansion."""

import json

import pytest
import torch

from megatron_r1v3.data.template import (
    CHAT_TEMPLATE,
    ImageTokenIds,
    SampleTooLong,
    encode_prompt_for_training,
    encode_prompt_for_vllm,
    encode_sft_sample,
    expand_image_tokens,
    image_token_ids,
    render_prompt,
)
from megatron_r1v3.data.tokenizer import (
    SPECIAL_TOKENS,
    TokenizerError,
    build_toy_tokenizer,
    check_special_ids,
    load_tokenizer,
    toy_corpus,
    toy_tokenizer,
)
from megatron_r1v3.presets import r1v3_38b, tiny

QUESTION = "What shape is shown in the image? Answer with one word."
RESPONSE = (
    "<think>\nIt has three straight sides and three corners, so it is a triangle.\n</think>\n\n"
    "The answer is \\boxed{triangle}."
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return toy_tokenizer(tmp_path_factory.getbasetemp() / "tokenizer-cache")


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_build_is_deterministic_with_fixed_special_ids(tmp_path, tok_dir):
    corpus = toy_corpus()
    a = build_toy_tokenizer(tmp_path / "a", corpus)
    b = build_toy_tokenizer(tmp_path / "b", corpus)
    files = sorted(p.name for p in a.iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"] == sorted(p.name for p in b.iterdir())
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes() == (tok_dir / name).read_bytes()
    other = build_toy_tokenizer(tmp_path / "c", corpus[:30])
    assert (other / "tokenizer.json").read_bytes() != (a / "tokenizer.json").read_bytes()
    vocab = json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]
    assert [vocab[t] for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert len(vocab) <= 1000
    with pytest.raises(ValueError, match="vocab_size"):
        build_toy_tokenizer(tmp_path / "d", corpus, vocab_size=100)


def test_auto_tokenizer_round_trip(tok, tok_dir, tmp_path):
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert (tok.start_image_token, tok.end_image_token, tok.context_image_token) == ("<img>", "</img>", "<IMG_CONTEXT>")
    assert (tok.start_image_token_id, tok.end_image_token_id, tok.context_image_token_id) == (3, 4, 5)
    assert tok.video_token == "<video>" and len(tok) <= 1000
    assert image_token_ids(tok) == ImageTokenIds(3, 4, 5)
    check_special_ids(tok, tiny())
    with pytest.raises(TokenizerError, match="image_context_token_id=151667"):
        check_special_ids(tok, r1v3_38b())
    text = "Ünïcödé 漢字 🙂 tabs\tand  spaces <img><IMG_CONTEXT></img> \\boxed{42}"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text and ids.count(5) == 1
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi", add_special_tokens=False)  # no bos added
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    assert config["extra_special_tokens"]["context_image_token"] == "<IMG_CONTEXT>"
    with pytest.raises(TokenizerError, match=str(tmp_path / "nowhere")):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="junk"):
        load_tokenizer(tmp_path / "junk")


def test_prompt_text_is_exact(tok):
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>\n"
        "What shape is shown in the image? Answer with one word.<|im_end|>\n<|im_start|>assistant\n<think>\n"
    )
    assert render_prompt(QUESTION, 1) == expected
    assert render_prompt("Q", 2).count("<image>\n") == 2 and "<image>" not in render_prompt("Q", 0)
    assert render_prompt("A <image> B <image>", 2).count("<image>") == 2
    with pytest.raises(ValueError, match="placeholders"):
        render_prompt("A <image>", 2)
    for content in ("<image>\n" + QUESTION, [{"type": "image"}, {"type": "text", "text": QUESTION}]):
        messages = [{"role": "user", "content": content}]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_loss_mask_covers_exactly_the_assistant_tokens(tok):
    enc = encode_sft_sample(tok, QUESTION, RESPONSE, [3], tokens_per_tile=4, max_length=512)
    ids, labels, mask = enc.input_ids, enc.labels, enc.loss_mask
    n = len(enc)
    assert labels.dtype == ids.dtype == torch.int64 and mask.dtype == torch.float32
    assert torch.equal(labels[:-1], ids[1:]) and labels[-1] == tok.pad_token_id and mask[-1] == 0
    answer = tok.encode(RESPONSE[len("<think>\n") :] + "<|im_end|>", add_special_tokens=False)
    assert ids[enc.prompt_length :].tolist() == answer
    assert ids[: enc.prompt_length].tolist() == encode_prompt_for_training(tok, QUESTION, [3], 4)
    on = mask.nonzero().flatten()
    assert on.tolist() == list(range(enc.prompt_length - 1, n - 1))  # predictions of exactly the answer tokens
    assert tok.decode(labels[mask.bool()]) == RESPONSE[len("<think>\n") :] + "<|im_end|>"
    assert enc.n_image_tokens == 12 == int((ids == 5).sum()) and not bool(mask[ids == 5].any())
    assert tok.decode(ids[: enc.prompt_length]).endswith("<|im_start|>assistant\n<think>\n")
    no_prefill = encode_sft_sample(tok, QUESTION, RESPONSE[len("<think>\n") :], [3], 4, 512)
    assert torch.equal(no_prefill.input_ids, ids)


def test_over_long_sample_raises_and_image_tokens_in_text_are_refused(tok):
    n = len(encode_sft_sample(tok, QUESTION, RESPONSE, [2], 4, 10_000))
    assert len(encode_sft_sample(tok, QUESTION, RESPONSE, [2], 4, n)) == n
    with pytest.raises(SampleTooLong) as info:
        encode_sft_sample(tok, QUESTION, RESPONSE, [2], 4, n - 1)
    assert (info.value.length, info.value.max_length) == (n, n - 1)
    with pytest.raises(ValueError, match="response contains image"):
        encode_sft_sample(tok, QUESTION, "<think>\nx</img></think>", [1], 4, 512)
    with pytest.raises(ValueError):
        encode_sft_sample(tok, "look <IMG_CONTEXT> here", RESPONSE, [1], 4, 512)
    with pytest.raises(ValueError, match="image special tokens"):
        encode_sft_sample(tok, "look </img> here", RESPONSE, [1], 4, 512)


@pytest.mark.parametrize("tiles,per_tile", [([1], 4), ([2, 5], 4), ([13], 256), ([], 4)])
def test_vllm_form_expands_to_the_training_form(tok, tiles, per_tile):
    ids = image_token_ids(tok)
    training = encode_prompt_for_training(tok, QUESTION, tiles, per_tile)
    assert training.count(ids.context) == per_tile * sum(tiles)
    assert training.count(ids.start) == training.count(ids.end) == len(tiles)
    for wrap in (False, True):
        vllm = encode_prompt_for_vllm(tok, QUESTION, len(tiles), wrap_images=wrap)
        assert vllm.count(ids.context) == len(tiles) and vllm.count(ids.start) == (len(tiles) if wrap else 0)
        assert expand_image_tokens(vllm, tiles, per_tile, ids) == training
    text = expand_image_tokens(render_prompt(QUESTION, len(tiles)), tiles, per_tile)
    assert tok.encode(text, add_special_tokens=False) == training


def test_expansion_refuses_mismatches(tok):
    ids = image_token_ids(tok)
    vllm = encode_prompt_for_vllm(tok, QUESTION, 2)
    with pytest.raises(ValueError, match="2 image placeholders but 1"):
        expand_image_tokens(vllm, [1], 4, ids)
    with pytest.raises(ValueError, match="3 image placeholders but 2"):
        expand_image_tokens(vllm + [ids.context], [1, 1], 4, ids)
    with pytest.raises(ValueError, match="1 image placeholders but 2"):
        expand_image_tokens(render_prompt("Q", 1), [1, 1], 4)
    with pytest.raises(ValueError, match="already"):
        expand_image_tokens(encode_prompt_for_training(tok, QUESTION, [1], 4), [1], 4, ids)
    with pytest.raises(ValueError, match="token_ids"):
        expand_image_tokens(vllm, [1, 1], 4)
    with pytest.raises(ValueError, match=">= 1 tile"):
        expand_image_tokens(render_prompt("Q", 1), [0], 4)
