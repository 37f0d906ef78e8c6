"""A Qwen2.5 / Skywork-R1V3-style tokenizer for tests, built offline with `tokenizers` (no download).

The real layout, not the toy tokenizer's: byte-level BPE behind Qwen2's pre-tokenizer regex, a small vocabulary
learned from the toy task's texts at ids 0..N-1, unused filler tokens up to 151642 (Qwen2.5's 151643 regular
tokens), Qwen2.5's special tokens at their real ids 151643-151664, and the InternVL / Skywork-R1V3 additions at
151665-151673 (`<img>`, `</img>`, `<IMG_CONTEXT>`, `<quad>` ... `</box>`): 151674 tokens, the R1V3 model's vocab.
`tokenizer_config.json` reads like the published one: class `Qwen2Tokenizer`, `bos_token: null`, eos `<|im_end|>`,
pad `<|endoftext|>`, `added_tokens_decoder`, a ChatML template, and NO named start/end/context image tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

QWEN_PRETOKENIZE_REGEX = (  # transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
FIRST_SPECIAL_ID = 151643
# (token, special) in id order from 151643, as Qwen2.5's tokenizer_config.json lists them
QWEN_SPECIALS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# what InternVL / Skywork-R1V3 append (151665...)
INTERNVL_SPECIALS: tuple[str, ...] = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                                      "<box>", "</box>")
QWEN_VOCAB_SIZE = FIRST_SPECIAL_ID + len(QWEN_SPECIALS) + len(INTERNVL_SPECIALS)  # 151674
# Qwen2.5's ChatML template without the tool-calling branches (the real one's default system prompt)
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
    "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == "
    "'system' and loop.first) %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
VERSION = 1  # bump when the recipe changes (cache key)


def qwen_model_overrides(tokenizer_dir: str | Path) -> list[str]:
    """`key=value` overrides running the `tiny-qwen` preset (Qwen2.5's ids and vocab) with this tokenizer."""
    return ["model.preset=tiny-qwen", f"data.tokenizer={tokenizer_dir}"]


def _learned_bpe(vocab_size: int) -> dict:
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on the toy task's texts; its tokenizer.json as a dict."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from megatron_r1v3.data.tokenizer import template_corpus, toy_corpus

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(toy_corpus() + template_corpus(), trainer)
    return json.loads(tok.to_str())


def build_qwen_tokenizer(out_dir: str | Path, learned_vocab: int = 1000) -> Path:
    """Write tokenizer.json, vocab.json, merges.txt and tokenizer_config.json of the Qwen-layout tokenizer."""
    from tokenizers import Tokenizer

    spec = _learned_bpe(learned_vocab)
    vocab: dict[str, int] = spec["model"]["vocab"]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise AssertionError("learned BPE ids are not 0..N-1")
    for i in range(len(vocab), FIRST_SPECIAL_ID):  # never produced by a merge: unused ids, decodable
        vocab[f"<|unused_{i}|>"] = i
    specials = list(QWEN_SPECIALS) + [(t, True) for t in INTERNVL_SPECIALS]
    added = [{"id": FIRST_SPECIAL_ID + i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": special} for i, (t, special) in enumerate(specials)]
    spec["added_tokens"] = added
    spec["model"].update(dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                         fuse_unk=False, byte_fallback=False, ignore_merges=False)
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                              "use_regex": False}
    Tokenizer.from_str(json.dumps(spec))  # `tokenizers` accepts it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                  "single_word", "special")} for a in added},
        "additional_special_tokens": [t for t, _ in QWEN_SPECIALS[1:14]],  # <|im_start|> ... <|video_pad|>
        "bos_token": None,
        "chat_template": QWEN_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return out


def qwen_tokenizer(cache_dir: str | Path) -> Path:
    """The tokenizer directory under `cache_dir`, built once (safe when several processes race)."""
    key = hashlib.sha256(json.dumps([VERSION, QWEN_PRETOKENIZE_REGEX, QWEN_SPECIALS, INTERNVL_SPECIALS,
                                     QWEN_CHAT_TEMPLATE]).encode()).hexdigest()[:10]
    final = Path(cache_dir) / f"qwen-tokenizer-{key}"
    if (final / "tokenizer_config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".qwen-tokenizer-", dir=final.parent))
    try:
        build_qwen_tokenizer(staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
