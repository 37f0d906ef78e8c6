"""Rank 0's side of GRPO: the colocated vLLM engine, prompts, sampling and rewards; and the trainer's pixel source.

The engine serves our model through the native InternVL layout (`rollout.hf_export`); it starts with throw-away
weights and receives the trainer's by `refit` before the first rollout. Sampling seeds are a function of (run seed,
step, prompt), so an episode is reproducible after a restart.
"""

from __future__ import annotations

import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_r1v3.config import RunConfig, prompt_token_budget
from megatron_r1v3.data.records import Sample
from megatron_r1v3.metrics.entropy import critical_mask
from megatron_r1v3.parallel.wait import compute_on_rank
from megatron_r1v3.rl.batch import Rollout
from megatron_r1v3.rl.prompts import Prompt, fit_prompts, make_prompt
from megatron_r1v3.rl.scoring import RewardScorer
from megatron_r1v3.rollout.refit import RefitStats, refit


def max_response_tokens(cfg: RunConfig, step: int) -> int:
    """The response budget at `step` (rl.length_schedule: the last entry whose step has been reached)."""
    tokens = cfg.rl.max_response_tokens
    for at, value in sorted((int(a), int(v)) for a, v in cfg.rl.length_schedule):
        if step >= at:
            tokens = value
    return tokens


def longest_response(cfg: RunConfig) -> int:
    return max([cfg.rl.max_response_tokens] + [int(v) for _, v in cfg.rl.length_schedule])


def sampling_seeds(seed: int, step: int, round_: int, indices: Sequence[int], stride: int) -> list[int]:
    """One seed per prompt; vLLM adds 0..n-1 for the samples, so prompts are `stride` (>= n) apart."""
    base = (seed * 1_000_003 + step * 1_009 + round_) * 65_537
    return [(base + i * stride) % 2**31 for i in indices]


class TileCache:
    """Least recently used prompt tiles, bounded by their bytes (a text-only prompt's None costs nothing); tiles
    larger than the whole budget are not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: OrderedDict[int, torch.Tensor | None] = OrderedDict()

    @staticmethod
    def size(tiles: torch.Tensor | None) -> int:
        return 0 if tiles is None else tiles.numel() * tiles.element_size()

    def __contains__(self, index: int) -> bool:
        return index in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        self._items.move_to_end(index)
        return self._items[index]

    def put(self, index: int, tiles: torch.Tensor | None) -> None:
        size = self.size(tiles)
        if index in self._items:
            self.bytes -= self.size(self._items.pop(index))
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            self.bytes -= self.size(self._items.popitem(last=False)[1])
        self._items[index] = tiles
        self.bytes += size


class PixelSource:
    """Tiles of a prompt's images with the rollout engine's own image processor. Only first-stage ranks call it, for
    their own rows, once per prompt and episode (`rl.batch.episode_tiles`); an LRU cache of `rl.pixel_cache_mb`
    keeps recent prompts (held-out prompts, buffer replays) without growing with the run. Prompts longer than
    `rl.max_prompt_tokens` are dropped here (`rl.prompts.fit_prompts`: `skipped`, `positions`), so no sampler or
    evaluation ever draws them."""

    def __init__(self, cfg: RunConfig, samples: Sequence[Sample], tokenizer, blank_images: bool = False):
        from megatron_r1v3.rollout.hf_export import make_image_processor

        self.processor = make_image_processor(cfg.model, cfg.data.max_tiles, cfg.data.use_thumbnail)
        fit = fit_prompts(samples, tokenizer, cfg.model, cfg.data.max_tiles, prompt_token_budget(cfg), cfg.data.strict)
        self.samples, self.positions, self.skipped, self.tokenizer = fit.samples, fit.positions, fit.skipped, tokenizer
        self.cache = TileCache(cfg.rl.pixel_cache_mb * 2**20)
        self.tiled = 0  # prompts tiled by this process (cache misses)
        self.blank_images = blank_images  # the blind control: white images (`make_prompt`)

    def prompt(self, index: int) -> Prompt:
        return make_prompt(self.samples[index], index, self.tokenizer, self.blank_images)

    def __call__(self, index: int) -> torch.Tensor | None:
        if index in self.cache:
            return self.cache[index]
        images = self.prompt(index).images
        tiles = self.processor(images=images, return_tensors="pt")["pixel_values"].float() if images else None
        self.tiled += 1
        self.cache.put(index, tiles)
        return tiles


def scored_rollouts(prompt: Prompt, samples: Sequence, scores: Sequence, step: int, tokenizer,
                    critical_tokens) -> list[Rollout]:
    """One prompt's group: the engine's samples (ids, logprobs, finish reason, text) with their rewards and the mask
    of critical tokens (for the entropy that checkpoint selection reads)."""
    return [Rollout(prompt.index, s.prompt_token_ids, s.token_ids, s.logprobs, sc.total, sc.accuracy, sc.format,
                    s.finish_reason, step, critical=critical_mask(tokenizer, s.token_ids, critical_tokens),
                    text=s.text)
            for s, sc in zip(samples, scores)]


class RolloutWorker:
    """The engine and reward computation (rank 0 only)."""

    def __init__(self, cfg: RunConfig, model_dir: Path, tokenizer):
        from megatron_r1v3.rollout.engine import RolloutEngine, rollout_dtype

        r = cfg.rl
        self.cfg, self.tokenizer = cfg, tokenizer
        self.seconds: dict[str, float] = defaultdict(float)  # engine time vs reward time, reset by the caller
        dtype = rollout_dtype(r.rollout_dtype)  # auto: bf16 on GPU, fp32 on CPU
        self.verifier = None
        if r.verifier_model:
            from megatron_r1v3.rl.verifier import EngineVerifier

            self.verifier = EngineVerifier(r.verifier_model, seed=cfg.seed, kv_cache_mb=r.kv_cache_mb,
                                           gpu_memory_utilization=r.gpu_memory_utilization / 2, dtype=dtype)
        self.scorer = RewardScorer(r.reward_workers, r.reward_timeout_s, r.w_acc, r.w_fmt, self.verifier)
        self.engine = RolloutEngine(
            model_dir, max_model_len=prompt_token_budget(cfg) + longest_response(cfg), seed=cfg.seed, dtype=dtype,
            kv_cache_bytes=r.kv_cache_mb * 2**20, gpu_memory_utilization=r.gpu_memory_utilization,
            max_images_per_prompt=8, max_num_seqs=max(64, r.samples_per_prompt),
        )

    def sample(self, prompts: Sequence[Prompt], n: int, max_tokens: int, temperature: float, seeds: Sequence[int],
               step: int) -> list[list[Rollout]]:
        """`n` scored rollouts per prompt."""
        r, m = self.cfg.rl, self.cfg.model
        t0 = time.perf_counter()
        # an image placeholder inside a response would be taken for an image slot by the trainer: never sample one
        banned = [m.image_context_token_id, m.image_start_token_id, m.image_end_token_id]
        outs = self.engine.generate([(p.prompt_ids, p.images) for p in prompts], n=n, temperature=temperature,
                                    top_p=r.top_p, max_tokens=max_tokens, seed=list(seeds),
                                    stop_token_ids=[m.eos_token_id], banned_token_ids=banned)
        t1 = time.perf_counter()
        pairs = [(p, s) for p, samples in zip(prompts, outs) for s in samples]  # the whole episode in one batch
        flat = iter(self.scorer.score([s.text for _, s in pairs], [p.answer for p, _ in pairs],
                                      [p.question for p, _ in pairs], [p.options for p, _ in pairs]))
        groups = [scored_rollouts(p, samples, [next(flat) for _ in samples], step, self.tokenizer,
                                  r.critical_tokens) for p, samples in zip(prompts, outs)]
        self.seconds["generate"] += t1 - t0
        self.seconds["reward"] += time.perf_counter() - t1
        return groups

    def close(self) -> None:
        self.scorer.close()
        self.engine.close()
        if self.verifier is not None:
            self.verifier.close()


def start_rollouts(cfg: RunConfig, tokenizer_dir: Path, tokenizer, model_dir: Path) -> RolloutWorker | None:
    """Collective. Rank 0 writes the engine's model directory (throw-away weights: the first refit replaces them)
    and starts the engine — minutes for the 38B, so the other ranks wait as long as it is alive
    (`parallel.wait.compute_on_rank`) rather than inside a timed collective. Returns the worker on rank 0, None
    elsewhere."""
    from megatron_r1v3.config import torch_dtype
    from megatron_r1v3.rollout.engine import rollout_dtype
    from megatron_r1v3.rollout.hf_export import ServingSettings, write_vllm_model_dir

    started: list[RolloutWorker] = []

    def start() -> float:
        # in the dtype the engine serves (config.json's torch_dtype and the throw-away weights agree with it)
        write_vllm_model_dir(model_dir, cfg.model, tokenizer_dir, torch_dtype(rollout_dtype(cfg.rl.rollout_dtype)),
                             seed=cfg.seed, serving=ServingSettings.from_run(cfg))  # the export's writer too
        started.append(RolloutWorker(cfg, model_dir, tokenizer))
        return started[0].engine.start_seconds

    compute_on_rank(start, "start rollout engine", cfg.parallel.timeout_s)
    return started[0] if started else None


def refit_worker(worker: RolloutWorker | None, chunks, cfg: RunConfig) -> RefitStats:
    """Collective: every rank feeds the weight stream, rank 0's engine loads it."""
    return refit(worker.engine if worker else None, chunks, cfg.model, cfg.rl.refit_bucket_mb)
