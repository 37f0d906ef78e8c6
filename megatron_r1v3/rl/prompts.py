"""RL prompts: records (question, answer, images) from JSONL/Parquet, drawn in shuffled epochs, resumable.

Every rank reads the same records and draws the same indices (the sampler is a pure function of seed, epoch and
position), so a rollout can be shipped between ranks as indices + token ids, never as pixels. Images are decoded
once per use with the project's Pillow decoder (RGB), the form vLLM's processor takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_r1v3.data.decode_pillow import open_rgb
from megatron_r1v3.data.records import RecordReader, Sample
from megatron_r1v3.data.template import encode_prompt_for_vllm


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
    """Every usable record of `paths` (bad ones skipped by RecordReader unless strict); error if none is left."""
    samples = list(RecordReader(list(paths), root=root, strict=strict))
    if not samples:
        raise ValueError(f"no usable RL prompts in {list(paths)}")
    return samples


def make_prompt(sample: Sample, index: int, tokenizer) -> Prompt:
    """Decode the images and encode the question in the R1V3 template (vLLM form)."""
    blobs = sample.load_images()
    sources = sample.image_sources()
    images = [open_rgb(b, i, sources[i] if i < len(sources) else None) for i, b in enumerate(blobs)]
    options = (sample.meta or {}).get("options")
    return Prompt(index, sample.id or sample.source, sample.question, sample.answer, options,
                  encode_prompt_for_vllm(tokenizer, sample.question, len(images)), images)


class PromptSampler:
    """Endless epochs over `n` prompts, each epoch a fresh permutation from (seed, epoch); state = (epoch, pos)."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        if n < 1:
            raise ValueError("PromptSampler needs at least one prompt")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

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
