"""The R1V3 chat template (slow-thinking mode) and the token layout of prompts and SFT samples.

Prompt text, with one `<image>` line per image (spec §1):
    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<image>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n
and the response continues `...</think>\\n\\nThe answer is \\\\boxed{X}.<|im_end|>`. `<think>` is plain text.

Two token forms of the same prompt:
- training form: every image placeholder becomes `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * tiles) + `</img>`,
  the ids the model sees (the embeddings at `<IMG_CONTEXT>` are replaced 1:1 by connector outputs);
- vLLM form: ONE `<IMG_CONTEXT>` per image (the placeholder of HF's InternVLProcessor, which vLLM's processor
  expands by the same rule). `expand_image_tokens` turns it into the training form; so does it for the wrapped
  form `<img><IMG_CONTEXT></img>` and for the `<image>` text placeholder.

SFT label convention: `labels[t] = input_ids[t + 1]` and `loss_mask[t]` weights that prediction; it is 1 exactly
when `input_ids[t + 1]` is an assistant token (the response after the `<think>\\n` prefill, final `<|im_end|>`
included). The last position has no next token: its label is the pad id and its mask 0. So the loss counts
`len(response tokens)` predictions and never one of a system, user, image or padding token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "You are a helpful assistant."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
THINK_PREFILL = "<think>\n"
IMAGE_PLACEHOLDER = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# The same layout as Jinja, stored in tokenizer_config.json so `apply_chat_template` (HF, vLLM) renders
# `render_prompt` exactly. Content may be a string or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}{%- endif -%}"
)

_TEXT_PLACEHOLDER = re.compile(
    re.escape(IMG_START + IMG_CONTEXT + IMG_END) + "|" + re.escape(IMG_CONTEXT) + "|" + re.escape(IMAGE_PLACEHOLDER)
)


class SampleTooLong(ValueError):
    """A sample longer than the sequence budget; callers skip and count it (never truncated: a cut trace
    would teach the model to stop mid-thought)."""

    def __init__(self, length: int, max_length: int) -> None:
        self.length, self.max_length = length, max_length
        super().__init__(f"sample has {length} tokens, more than max_length={max_length}")

    def __reduce__(self):  # keep the fields when pickled across DataLoader workers
        return (type(self), (self.length, self.max_length))


@dataclass(frozen=True)
class ImageTokenIds:
    """Ids of `<img>`, `</img>` and `<IMG_CONTEXT>` in one tokenizer (3, 4, 5 in the toy one)."""

    start: int
    end: int
    context: int


@dataclass(frozen=True)
class EncodedSample:
    """One SFT sample as 1-D tensors of equal length (label convention in the module docstring)."""

    input_ids: torch.Tensor  # int64 [n]
    labels: torch.Tensor  # int64 [n]
    loss_mask: torch.Tensor  # float32 [n]
    n_image_tokens: int  # <IMG_CONTEXT> count = tokens_per_tile * total tiles
    prompt_length: int  # tokens up to and including the `<think>\n` prefill

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def image_token_ids(tokenizer: PreTrainedTokenizerBase) -> ImageTokenIds:
    """Look up the three image special tokens; a tokenizer without them raises ValueError naming the token."""
    found = {}
    for name, token in (("start", IMG_START), ("end", IMG_END), ("context", IMG_CONTEXT)):
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"tokenizer has no single token for {token!r} (it encodes to {ids})")
        found[name] = ids[0]
    return ImageTokenIds(**found)


def render_prompt(question: str, n_images: int = 1, system: str = SYSTEM_PROMPT) -> str:
    """The R1V3 prompt text with `<image>` placeholders, ending with the `<think>\\n` prefill.

    A question that already holds `<image>` placeholders (interleaved data) keeps them where they are, and then
    their count must equal `n_images`; otherwise one `<image>\\n` line per image goes before the question.
    """
    if n_images < 0:
        raise ValueError(f"n_images must be >= 0, got {n_images}")
    inline = question.count(IMAGE_PLACEHOLDER)
    if inline and inline != n_images:
        raise ValueError(f"question has {inline} {IMAGE_PLACEHOLDER} placeholders but there are {n_images} images")
    images = "" if inline else (IMAGE_PLACEHOLDER + "\n") * n_images
    return (
        f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{images}{question}{IM_END}\n"
        f"{IM_START}assistant\n{THINK_PREFILL}"
    )


def _block_text(n_tokens: int) -> str:
    return IMG_START + IMG_CONTEXT * n_tokens + IMG_END


def _expand_text(text: str, counts: list[int]) -> str:
    if IMG_CONTEXT * 2 in text:
        raise ValueError("prompt already holds expanded image tokens")
    found = _TEXT_PLACEHOLDER.findall(text)
    if len(found) != len(counts):
        raise ValueError(f"prompt has {len(found)} image placeholders but {len(counts)} images were given")
    it = iter(counts)
    return _TEXT_PLACEHOLDER.sub(lambda _m: _block_text(next(it)), text)


def _expand_ids(ids: list[int], counts: list[int], tok: ImageTokenIds) -> list[int]:
    found = sum(1 for t in ids if t == tok.context)
    if any(a == b == tok.context for a, b in zip(ids, ids[1:])):
        raise ValueError("prompt already holds expanded image tokens")
    if found != len(counts):
        raise ValueError(f"prompt has {found} image placeholders but {len(counts)} images were given")
    out: list[int] = []
    it = iter(counts)
    i, n = 0, len(ids)
    while i < n:
        if ids[i] != tok.context:
            out.append(ids[i])
            i += 1
            continue
        wrapped = bool(out) and out[-1] == tok.start and i + 1 < n and ids[i + 1] == tok.end
        if wrapped:
            out.pop()
        out += [tok.start] + [tok.context] * next(it) + [tok.end]
        i += 2 if wrapped else 1
    return out


def expand_image_tokens(
    prompt: str | Sequence[int],
    tiles_per_image: Sequence[int],
    tokens_per_tile: int,
    token_ids: ImageTokenIds | None = None,
) -> str | list[int]:
    """Turn each image placeholder into `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile * tiles) + `</img>`.

    Text: placeholders are `<image>`, a lone `<IMG_CONTEXT>` or `<img><IMG_CONTEXT></img>`. Ids (needs
    `token_ids`): a lone `<IMG_CONTEXT>` id, wrapped or not. This is the rule vLLM / HF processors apply to the
    vLLM form, so the result equals the training form token for token.
    """
    if tokens_per_tile < 1:
        raise ValueError(f"tokens_per_tile must be >= 1, got {tokens_per_tile}")
    counts = [tokens_per_tile * int(t) for t in tiles_per_image]
    if any(c < 1 for c in counts):
        raise ValueError(f"every image needs >= 1 tile, got {list(tiles_per_image)}")
    if isinstance(prompt, str):
        return _expand_text(prompt, counts)
    if token_ids is None:
        raise ValueError("expanding token ids needs token_ids (see image_token_ids(tokenizer))")
    return _expand_ids([int(t) for t in prompt], counts, token_ids)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def encode_prompt_for_vllm(
    tokenizer: PreTrainedTokenizerBase, question: str, n_images: int, wrap_images: bool = False
) -> list[int]:
    """Prompt ids with ONE `<IMG_CONTEXT>` per image (vLLM expands it); `wrap_images` adds `<img>`/`</img>`."""
    one = _block_text(1) if wrap_images else IMG_CONTEXT
    return _encode(tokenizer, render_prompt(question, n_images).replace(IMAGE_PLACEHOLDER, one))


def encode_prompt_for_training(
    tokenizer: PreTrainedTokenizerBase, question: str, tiles_per_image: Sequence[int], tokens_per_tile: int
) -> list[int]:
    """Prompt ids with every image expanded to its `<IMG_CONTEXT>` block (tokenized from the expanded text)."""
    text = render_prompt(question, len(tiles_per_image))
    return _encode(tokenizer, expand_image_tokens(text, tiles_per_image, tokens_per_tile))


def strip_think_prefill(response: str) -> str:
    """The response without a leading `<think>\\n` (the prompt already ends with that prefill)."""
    return response[len(THINK_PREFILL) :] if response.startswith(THINK_PREFILL) else response


def encode_sft_sample(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    response: str,
    tiles_per_image: Sequence[int],
    tokens_per_tile: int,
    max_length: int,
) -> EncodedSample:
    """Prompt (training form) + response + `<|im_end|>` as ids, shifted labels and the assistant loss mask.

    Raises SampleTooLong when the whole sample exceeds `max_length` tokens (nothing is truncated) and ValueError
    when the text itself contains image special tokens (they would break the image splice).
    """
    tok = image_token_ids(tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("tokenizer has no pad token (needed for the label of the last position)")
    prompt = encode_prompt_for_training(tokenizer, question, tiles_per_image, tokens_per_tile)
    n_image = tokens_per_tile * sum(int(t) for t in tiles_per_image)
    image_ids = {tok.start, tok.end, tok.context}
    if sum(t in image_ids for t in prompt) != n_image + 2 * len(tiles_per_image):
        raise ValueError("question contains image special tokens outside the image placeholders")
    answer = _encode(tokenizer, strip_think_prefill(response) + IM_END)
    if any(t in image_ids for t in answer):
        raise ValueError("response contains image special tokens")
    length = len(prompt) + len(answer)
    if length > max_length:
        raise SampleTooLong(length, max_length)
    input_ids = torch.tensor(prompt + answer, dtype=torch.int64)
    labels = torch.full_like(input_ids, pad)
    labels[:-1] = input_ids[1:]
    loss_mask = torch.zeros(length, dtype=torch.float32)
    loss_mask[len(prompt) - 1 : length - 1] = 1.0
    return EncodedSample(input_ids, labels, loss_mask, n_image, len(prompt))
