"""GRPO's rollouts on SPMD engines (`rl.rollout_tp >= 1`, `rollout.engine_group`): every rank hosts its part of an
engine, so the episode runs on every rank in lockstep - the prompt sampler and sample buffer are deterministic and
checkpointed per rank, and every rank gets the whole episode's samples - instead of on rank 0 alone.

Rewards are scored on each engine's lead rank for that engine's share of the prompts (one `RewardScorer` per lead,
in parallel across engines); the scores travel with the samples. With `rl.verifier_model`, each engine's ranks also
host a judge engine at the same TP, asked (as on rank 0) for the items the rule check marked wrong on a boxed
answer (`judge_split`). Weights: the first refit pushes everything into the dummy-started engines, later ones
only what `train.trainable` lets change (`rollout.spmd_refit`). Around each refit the engines follow the colocated
GPU choreography (sleep after generation; wake weights, refit, wake KV cache); on CPU those calls are no-ops that
are still made.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch.distributed as dist

from megatron_r1v3.config import RunConfig, prompt_token_budget, torch_dtype
from megatron_r1v3.rl.batch import Rollout
from megatron_r1v3.rl.prompts import Prompt
from megatron_r1v3.rl.rewards import verifier_failure
from megatron_r1v3.rl.rollouts import longest_response, refit_worker, scored_rollouts, start_rollouts
from megatron_r1v3.rl.scoring import RewardScorer, judged_correct, wants_verdict
from megatron_r1v3.rollout.engine import rollout_dtype
from megatron_r1v3.rollout.engine_group import EngineLayout, generate_split, start_engine, write_dummy_model_dir
from megatron_r1v3.rollout.refit import RefitStats
from megatron_r1v3.rollout.spmd_refit import EngineRefit


class _GatheredCounts:
    """`RewardScorer.take_counts` for the whole episode: the leads' counts, gathered with the samples."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def take_counts(self) -> Counter[str]:
        out, self.counts = self.counts, Counter()
        return out


class EngineGroupWorker:
    """This rank's part of the SPMD engines, with the `RolloutWorker` interface (`sample`, `seconds`, `scorer`,
    `verifier`, `close`); `sample` and `refit` are collective over the world."""

    spmd = True

    def __init__(self, cfg: RunConfig, model_dir: Path, tokenizer, chunks):
        r = cfg.rl
        world = dist.get_world_size()
        self.cfg, self.tokenizer, self.rank = cfg, tokenizer, dist.get_rank()
        self.layout = EngineLayout(world, r.rollout_tp, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        self.index = self.layout.engine_of(self.rank)
        self.lead = self.rank == self.layout.lead(self.index)
        self.seconds: dict[str, float] = defaultdict(float)
        self.verifier = None
        self.scorer = _GatheredCounts()
        self.rewards = RewardScorer(r.reward_workers, r.reward_timeout_s, r.w_acc, r.w_fmt) if self.lead else None
        self.prompts_per_engine = [0] * self.layout.engines  # counted over the run
        self.engine = start_engine(
            self.layout, model_dir, max_model_len=prompt_token_budget(cfg) + longest_response(cfg), seed=cfg.seed,
            dtype=rollout_dtype(r.rollout_dtype), kv_cache_bytes=r.kv_cache_mb * 2**20,
            gpu_memory_utilization=r.gpu_memory_utilization, max_images_per_prompt=8,
            max_num_seqs=max(64, r.samples_per_prompt), load_format="dummy")
        self.refitter = EngineRefit(chunks, cfg.model, r.refit_bucket_mb, engine_tp=r.rollout_tp)
        if r.verifier_model:  # the judge beside the policy: same ranks, same TP (vLLM's groups are per process)
            from megatron_r1v3.rl.verifier import EngineVerifier

            self.verifier = EngineVerifier(r.verifier_model, seed=cfg.seed, kv_cache_mb=r.kv_cache_mb,
                                           gpu_memory_utilization=r.gpu_memory_utilization / 2,
                                           dtype=rollout_dtype(r.rollout_dtype), world=self.engine.world)

    def _score_share(self, share: range, outs: list[list], prompts: Sequence[Prompt]) -> list:
        """On a lead: rewards of its engine's share; the first item also carries the share's reason counts."""
        flat = [(prompts[i], s) for i, samples in zip(share, outs) for s in samples]
        scores = iter(self.rewards.score([s.text for _, s in flat], [p.answer for p, _ in flat],
                                         [p.question for p, _ in flat], [p.options for p, _ in flat]))
        items = [[next(scores) for _ in samples] for samples in outs]
        counts = self.rewards.take_counts()
        return [(x, counts if k == 0 else None) for k, x in enumerate(items)]

    def sample(self, prompts: Sequence[Prompt], n: int, max_tokens: int, temperature: float, seeds: Sequence[int],
               step: int) -> list[list[Rollout]]:
        """Collective: `n` scored rollouts per prompt, the prompts split across the engines."""
        r, m = self.cfg.rl, self.cfg.model
        banned = [m.image_context_token_id, m.image_start_token_id, m.image_end_token_id]
        t0 = time.perf_counter()
        split = generate_split(
            self.engine, self.layout, [(p.prompt_ids, p.images) for p in prompts], list(seeds),
            on_lead=lambda share, outs: self._score_share(share, outs, prompts), n=n, temperature=temperature,
            top_p=r.top_p, max_tokens=max_tokens, stop_token_ids=[m.eos_token_id], banned_token_ids=banned)
        for e, k in enumerate(split.prompts_per_engine):
            self.prompts_per_engine[e] += k
        if self.verifier is not None:
            judge_split(self.verifier, self.layout, prompts, split, self.cfg.rl.w_acc)
        groups = []
        for p, samples, (scores, counts) in zip(prompts, split.samples, split.extra):
            if counts:
                self.scorer.counts.update(counts)
            groups.append(scored_rollouts(p, samples, scores, step, self.tokenizer, r.critical_tokens))
        self.seconds["generate"] += time.perf_counter() - t0  # generation and the leads' scoring overlap per engine
        return groups

    def refit(self, chunks) -> RefitStats:
        """Collective: wake the weights, push (freeze-aware), wake the KV cache."""
        self.engine.wake_up(["weights"])
        stats = self.refitter(self.engine, chunks, label=f"engine {self.index}: ")
        self.engine.wake_up(["kv_cache"])
        return stats

    def sleep(self) -> None:
        """After generation: free the KV cache and offload the weights (GPU) while the trainer runs."""
        self.engine.sleep(level=1)

    def close(self) -> None:
        if self.rewards is not None:
            self.rewards.close()
        self.engine.close()
        if self.verifier is not None:
            self.verifier.close()


def judge_split(verifier, layout: EngineLayout, prompts: Sequence[Prompt], split, w_acc: float) -> list:
    """Collective: where the rule check said wrong on a boxed answer, ask the judge (as `RewardScorer` does on rank
    0) and make a yes a correct answer. `split.extra[i]` = (prompt i's `RewardBreakdown`s, counts), gathered, so the
    same on every rank: each engine's ranks find the same items of their engine's share and judge them together
    (vLLM's TP lockstep); the verdicts are all-gathered and applied on every rank alike. Returns every engine's
    ((prompt, sample), verdict) in engine order; `verifier.calls` counts the whole episode's items."""
    rank = dist.get_rank()
    engine = layout.engine_of(rank)
    share = layout.shares(len(prompts))[engine]
    asks = [(i, k) for i in share for k, sc in enumerate(split.extra[i][0]) if wants_verdict(sc)]
    items = [(prompts[i].question, split.samples[i][k].text, prompts[i].answer) for i, k in asks]
    try:
        verdicts = verifier.judge(items) if items else []
    except Exception as err:  # as on the rank-0 path (`rewards.ask_verifier`): stop, naming the judge and where
        question, _, answer = items[0]
        where = f" on engine {engine}, rank {rank}, judging {len(items)} items (the first shown)"
        raise verifier_failure(verifier, question, answer, err, where) from err
    gathered: list = [None] * layout.world
    dist.all_gather_object(gathered, list(zip(asks, verdicts)) if rank == layout.lead(engine) else None)
    judged = [x for e in range(layout.engines) for x in gathered[layout.lead(e)]]
    verifier.calls += len(judged) - len(asks)  # the other engines' items: the metric is the episode's
    for (i, k), yes in judged:
        if yes is True:
            split.extra[i][0][k] = judged_correct(split.extra[i][0][k], w_acc)
    return judged


def start_engine_group(cfg: RunConfig, tokenizer_dir: Path, tokenizer, model_dir: Path, chunks) -> EngineGroupWorker:
    """Collective: each engine's lead writes config + tokenizer (no weights) into `model_dir/engine<e>`, then every
    rank starts its part of its engine (dummy weights; the first `refit` loads the trainer's)."""
    from megatron_r1v3.rollout.hf_export import ServingSettings

    layout = EngineLayout(dist.get_world_size(), cfg.rl.rollout_tp)
    rank = dist.get_rank()
    engine_dir = model_dir / f"engine{layout.engine_of(rank)}"
    if rank == layout.lead(layout.engine_of(rank)):
        write_dummy_model_dir(engine_dir, cfg.model, tokenizer_dir, torch_dtype(rollout_dtype(cfg.rl.rollout_dtype)),
                              ServingSettings.from_run(cfg))
    dist.barrier()
    return EngineGroupWorker(cfg, engine_dir, tokenizer, chunks)


def start_engines(cfg: RunConfig, tokenizer_dir: Path, tokenizer, model_dir: Path, chunks):
    """Collective: the run's rollout engines, as `rl.rollout_tp` says: an SPMD engine group over every rank (>= 1)
    or one engine in-process on rank 0 (0; None on the other ranks). GRPO, `r1v3 eval` and `select-checkpoint`."""
    if cfg.rl.rollout_tp > 0:
        return start_engine_group(cfg, tokenizer_dir, tokenizer, model_dir, chunks)
    return start_rollouts(cfg, tokenizer_dir, tokenizer, model_dir)


def refit_engines(worker, chunks, cfg: RunConfig) -> RefitStats:
    """Collective: push `chunks` into the engines `start_engines` returned."""
    return worker.refit(chunks) if cfg.rl.rollout_tp > 0 else refit_worker(worker, chunks, cfg)
