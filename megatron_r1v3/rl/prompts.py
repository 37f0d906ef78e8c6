"""RL prompts: records (question, answer, images) from JSONL/Parquet, drawn in shuffled epochs, resumable.

Every rank reads the same records and draws the same indices (the sampler is a pure function of seed, epoch and
position), so a rollout can be shipped between ranks as indices + token ids, never as pixels. Images are decoded
once per use with the project's Pillow decoder (RGB), the form vLLM's processor takes. Files in the common
Hugging Face benchmark layout (MMMU / MathVista: `image`, `options`, ...) are read by `data.benchmark`.

A prompt longer than `rl.max_prompt_tokens` after image expansion (text + tiles x tokens per tile) is dropped
before anything samples it (`fit_prompts`, as verl's `filter_overlong_prompts`): skipped, counted and named, never
sent to vLLM. Its length comes from the images' headers and the one tiling rule, without decoding pixels.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from megatron_r1v3.config import ModelConfig
from megatron_r1v3.data.benchmark import is_benchmark_file, read_benchmark
from megatron_r1v3.data.decode_pillow import ImageDecodeError, open_rgb
from megatron_r1v3.data.records import RecordError, RecordReader, Sample
from megatron_r1v3.data.template import encode_prompt_for_vllm
from megatron_r1v3.data.tiling import TilingConfig, num_tiles

log = logging.getLogger(__name__)
_EXIF_ORIENTATION = 0x0112


@dataclass
class Prompt:
    """One RL prompt: vLLM-form ids (one `<IMG_CONTEXT>` per image), reference answer, MC options, images."""

    index: int
    id: str
    question: str
    answer: str
    options: list[str] | None
    prompt_ids: list[int]
    images: list  # PIL RGB images


def load_prompts(paths: Sequence[str], root: str | None, strict: bool) -> list[Sample]:
    """Every usable record of `paths` (bad ones skipped by RecordReader unless strict; a benchmark file's bad row
    is always an error: its score must cover every row); error if none is left."""
    samples: list[Sample] = []
    for path in paths:
        if is_benchmark_file(path):
            samples += read_benchmark(path, root)
        else:
            samples += RecordReader(path, root=root, strict=strict)
    if not samples:
        raise ValueError(f"no usable RL prompts in {list(paths)}")
    return samples


BLANK_RGB = (255, 255, 255)


def make_prompt(sample: Sample, index: int, tokenizer, blank_images: bool = False) -> Prompt:
    """Decode the images and encode the question in the R1V3 template (vLLM form). `blank_images` (the blind
    control of `r1v3 eval --blank-images`): every image becomes a white one of the same size, so the prompt, the
    tiling and the token count stay those of the real item and only what the image shows is gone."""
    blobs = sample.load_images()
    sources = sample.image_sources()
    images = [open_rgb(b, i, sources[i] if i < len(sources) else None) for i, b in enumerate(blobs)]
    if blank_images:
        images = [Image.new("RGB", img.size, BLANK_RGB) for img in images]
    options = (sample.meta or {}).get("options")
    return Prompt(index, sample.id or sample.source, sample.question, sample.answer, options,
                  encode_prompt_for_vllm(tokenizer, sample.question, len(images)), images)


@dataclass
class SkippedPrompt:
    """A prompt left out before sampling: its position among the loaded records, name and why."""

    position: int
    id: str
    source: str
    tokens: int | None
    reason: str

    def as_dict(self) -> dict:
        return {"position": self.position, "id": self.id, "source": self.source, "tokens": self.tokens,
                "reason": self.reason}


@dataclass
class PromptFit:
    """The prompts that fit the budget (`positions[i]`: sample i's position among the loaded records) and the
    ones skipped."""

    samples: list[Sample]
    positions: list[int] = field(default_factory=list)
    skipped: list[SkippedPrompt] = field(default_factory=list)


def image_size(image: bytes | Path, index: int | None = None, source: str | None = None) -> tuple[int, int]:
    """(width, height) as the model sees the image (EXIF orientation applied), read from the header only (a path
    is not read further)."""
    try:
        with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as img:
            width, height = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception as exc:  # Pillow raises many types for a bad header
        raise ImageDecodeError(index, source, f"{type(exc).__name__}: {exc}") from exc
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def prompt_tokens(sample: Sample, tokenizer, model: ModelConfig, max_tiles: int) -> int:
    """Length of the prompt the engine builds: the vLLM-form ids with each `<IMG_CONTEXT>` expanded to `<img>` +
    tiles x tokens_per_tile + `</img>` (tiles by the engine's rule: InternVL grid, thumbnail on multi-tile images)."""
    images = list(sample.image_bytes) if sample.image_bytes is not None else list(sample.image_paths)
    sources = sample.image_sources()
    tiling = TilingConfig(tile_size=model.vision.image_size, max_tiles=max_tiles, use_thumbnail=True)
    tiles = [num_tiles(*image_size(x, i, sources[i] if i < len(sources) else None), tiling)
             for i, x in enumerate(images)]
    ids = encode_prompt_for_vllm(tokenizer, sample.question, len(images))
    return len(ids) + sum(t * model.tokens_per_tile + 1 for t in tiles)


def fit_prompts(samples: Sequence[Sample], tokenizer, model: ModelConfig, max_tiles: int, max_tokens: int,
                strict: bool = False) -> PromptFit:
    """Drop prompts longer than `max_tokens` (and, unless `strict`, ones whose image header cannot be read),
    logging each with its source on rank 0; every rank computes the same split. Error if none is left."""
    fit = PromptFit([])
    for position, sample in enumerate(samples):
        name = sample.id or sample.source
        try:
            n = prompt_tokens(sample, tokenizer, model, max_tiles)
        except (ImageDecodeError, OSError) as exc:
            if strict:
                raise
            fit.skipped.append(SkippedPrompt(position, name, sample.source, None, f"unreadable image: {exc}"))
        else:
            if n <= max_tokens:
                fit.samples.append(sample)
                fit.positions.append(position)
                continue
            fit.skipped.append(SkippedPrompt(position, name, sample.source, n,
                                             f"{n} tokens > rl.max_prompt_tokens={max_tokens}"))
        if not dist.is_initialized() or dist.get_rank() == 0:
            log.warning("skipping prompt %s (%s): %s", name, sample.source, fit.skipped[-1].reason)
    if samples and not fit.samples:
        first = fit.skipped[0]
        raise RecordError(first.source, f"{first.reason}; none of the {len(samples)} prompts is left (over"
                          f" rl.max_prompt_tokens={max_tokens} or unreadable)")
    if fit.skipped and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("skipped %d of %d prompts (over rl.max_prompt_tokens=%d or unreadable)", len(fit.skipped),
                    len(samples), max_tokens)
    return fit


def difficulties(samples: Sequence[Sample]) -> list[float]:
    """Each record's `meta.difficulty` (or `meta.level`, as MathVision and MMK12 exports name it), for the easy->hard
    curriculum; a record without one is an error naming it."""
    out = []
    for s in samples:
        meta = s.meta or {}
        value = meta.get("difficulty", meta.get("level"))
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            raise RecordError(s.source, f"rl.curriculum=easy_to_hard needs a numeric meta.difficulty (or meta.level)"
                              f" on every prompt; {s.id or s.source} has {value!r}") from None
    return out


class PromptSampler:
    """Endless epochs over `n` prompts, each epoch a fresh permutation from (seed, epoch); state = (epoch, pos).
    With `difficulty` (one number per prompt: the easy->hard curriculum) each epoch's permutation is stably sorted
    from easy to hard, so ties stay shuffled and every epoch climbs again."""

    def __init__(self, n: int, seed: int, shuffle: bool = True, difficulty: Sequence[float] | None = None):
        if n < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        if difficulty is not None and len(difficulty) != n:
            raise ValueError(f"PromptSampler: {len(difficulty)} difficulties for {n} prompts")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.difficulty = list(difficulty) if difficulty is not None else None
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        if self.difficulty is not None:
            order.sort(key=lambda i: self.difficulty[i])  # stable: shuffled within a difficulty
        return order

    def take(self, k: int) -> list[int]:
        """The next `k` prompt indices (crossing epochs as needed)."""
        out: list[int] = []
        while len(out) < k:
            order = self._order()
            chunk = order[self.pos : self.pos + k - len(out)]
            out.extend(chunk)
            self.pos += len(chunk)
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"resuming a prompt sampler over {state['n']} prompts with {self.n} prompts now"
                             " (the RL data changed since the checkpoint)")
        self.epoch, self.pos = state["epoch"], state["pos"]
