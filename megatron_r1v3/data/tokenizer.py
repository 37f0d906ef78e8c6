"""The toy tokenizer of the `tiny` preset: a real byte-level BPE Hugging Face fast tokenizer, built offline.

Special tokens sit at fixed ids matching `presets.tiny`: `<|endoftext|>`=0 (pad), `<|im_start|>`=1 (bos),
`<|im_end|>`=2 (eos), `<img>`=3, `</img>`=4, `<IMG_CONTEXT>`=5, `<video>`=6. The BPE merges are learned from the
toy task's texts plus the chat template, so those encode compactly; being byte-level, any other text (any
language, any bytes) still encodes and decodes losslessly. Training is deterministic: the byte alphabet is fixed
and sorted, and byte-level BPE has no continuing-subword tokens, whose hash-order ids made older `tokenizers`
trainers differ run to run.

The directory holds what `AutoTokenizer.from_pretrained` needs offline: `tokenizer.json` and
`tokenizer_config.json` with the R1V3 chat template and, like InternVL's "-hf" tokenizers, the named
`extra_special_tokens` start/end/context image tokens and the video token that HF's and vLLM's InternVL
processors read (`tokenizer.context_image_token`, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_r1v3.data.template import (
    CHAT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    THINK_PREFILL,
    render_prompt,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from megatron_r1v3.config import ModelConfig

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMG_START, IMG_END, IMG_CONTEXT, VIDEO_TOKEN)
NAMED_SPECIAL_TOKENS: dict[str, str] = {
    "start_image_token": IMG_START,
    "end_image_token": IMG_END,
    "context_image_token": IMG_CONTEXT,
    "video_token": VIDEO_TOKEN,
}
TOY_TOKENIZER_VERSION = 1  # bump when the build recipe changes, so cached copies are rebuilt
_BYTE_ALPHABET_SIZE = 256


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or does not fit the model; the message names the path or ids."""


def template_corpus() -> list[str]:
    """Template text every tokenizer should encode compactly: roles, think tags, the boxed-answer phrase."""
    return [
        render_prompt("What is shown?", 1),
        render_prompt("Compare the two images.", 2),
        f"{THINK_PREFILL}Let me look.\n</think>\n\nThe answer is \\boxed{{A}}.{EOS_TOKEN}",
        f"{IMAGE_PLACEHOLDER}\n",
    ]


def _train(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _finish_config(out_dir: Path) -> None:
    """Rewrite tokenizer_config.json in the layout both transformers 4.x and 5.x read (chat template inside)."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for key in NAMED_SPECIAL_TOKENS:
        cfg.pop(key, None)
    cfg["extra_special_tokens"] = dict(NAMED_SPECIAL_TOKENS)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    jinja = out_dir / "chat_template.jinja"  # transformers 5 writes the template here; keep one copy only
    if jinja.exists():
        jinja.unlink()


def build_toy_tokenizer(out_dir: str | os.PathLike, corpus_texts: Iterable[str], vocab_size: int = 1000) -> Path:
    """Train byte-level BPE on corpus + template text and save a HF fast tokenizer to `out_dir`; returns it.

    Same corpus and vocab_size give byte-identical files. The vocabulary has at most `vocab_size` entries
    (fewer when the corpus runs out of pairs seen twice).
    """
    from transformers import PreTrainedTokenizerFast

    floor = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    if vocab_size < floor:
        raise ValueError(f"vocab_size={vocab_size} is below the {floor} special + byte tokens")
    tok = _train(list(corpus_texts) + template_corpus(), vocab_size)
    for index, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != index:
            raise AssertionError(f"special token {token!r} got id {tok.token_to_id(token)}, expected {index}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=dict(NAMED_SPECIAL_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    _finish_config(out)
    return out


def toy_corpus(n_per_task: int = 48, seed: int = 0) -> list[str]:
    """Questions, answers and SFT traces (right and wrong, some with a reasoning move) of every toy task, from
    `synthetic.make_item`."""
    import numpy as np

    from megatron_r1v3.data.synthetic import TASKS, make_item

    texts: list[str] = []
    for task_index, task in enumerate(TASKS):
        for index in range(n_per_task):
            rng = np.random.default_rng([seed, task_index, index])
            move = {5: "fix", 6: "confirm"}.get(index % 8)  # traces with a reasoning move ("Wait, ...")
            _, fields = make_item(task, 32, rng, correct=index % 4 != 3, reflect=move)
            texts += [fields["question"], fields["response"], fields["answer"]]
    return texts


def toy_tokenizer(cache_dir: str | os.PathLike, vocab_size: int = 1000) -> Path:
    """Directory of the toy tokenizer under `cache_dir`, built on first use (safe if several processes race)."""
    corpus = toy_corpus()
    digest = hashlib.sha256(
        json.dumps([TOY_TOKENIZER_VERSION, vocab_size, corpus], ensure_ascii=False).encode("utf-8")
    ).hexdigest()[:12]
    final = Path(cache_dir) / f"toy-tokenizer-{digest}"
    if (final / "tokenizer_config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".toy-tokenizer-", dir=final.parent))
    try:
        build_toy_tokenizer(staging, corpus, vocab_size)
        try:
            staging.rename(final)
        except OSError:  # another process finished first; its copy is identical
            if not (final / "tokenizer_config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(path)` offline; any failure raises TokenizerError naming the path."""
    from transformers import AutoTokenizer

    where = Path(path)
    if not where.exists():
        raise TokenizerError(f"tokenizer path {where} does not exist")
    try:
        return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, JSON errors ... depending on the problem
        raise TokenizerError(f"cannot load a tokenizer from {where}: {type(exc).__name__}: {exc}") from exc


def check_special_ids(tokenizer: PreTrainedTokenizerBase, model_cfg: ModelConfig) -> None:
    """Check a tokenizer against a `config.ModelConfig`: special ids equal, vocab fits; errors name every field."""
    expected = {
        "pad_token_id": (model_cfg.pad_token_id, tokenizer.pad_token_id),
        "eos_token_id": (model_cfg.eos_token_id, tokenizer.eos_token_id),
        "image_start_token_id": (model_cfg.image_start_token_id, tokenizer.convert_tokens_to_ids(IMG_START)),
        "image_end_token_id": (model_cfg.image_end_token_id, tokenizer.convert_tokens_to_ids(IMG_END)),
        "image_context_token_id": (model_cfg.image_context_token_id, tokenizer.convert_tokens_to_ids(IMG_CONTEXT)),
    }
    if tokenizer.bos_token_id is not None:  # Qwen2.5's own tokenizer declares no bos token
        expected["bos_token_id"] = (model_cfg.bos_token_id, tokenizer.bos_token_id)
    errors = [f"model.{k}={want} but the tokenizer has {got}" for k, (want, got) in expected.items() if want != got]
    if len(tokenizer) > model_cfg.language.vocab_size:
        errors.append(
            f"tokenizer has {len(tokenizer)} tokens > model.language.vocab_size={model_cfg.language.vocab_size}"
        )
    if errors:
        raise TokenizerError("tokenizer does not match the model: " + "; ".join(errors))
