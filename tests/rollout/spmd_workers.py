"""The one launch of `test_spmd_engines.py`: training TP2·PP2 on 4 gloo ranks, 2 vLLM engines × rollout TP2
(external launcher, each engine its own world), started with dummy weights from config + tokenizer only, ViT frozen.

Checks, in order: logprobs of a fixed response (prompt with an image) on every engine rank vs Megatron after the
first (full) refit, each engine rank receiving only its TP slice of the decoder (the rows/columns it does not
receive are NaN: a loader reading them would show); the sleep/wake walk; the trainable weights change, the second
refit (collective transport: broadcasts over the pipeline group, no TP all-gather) carries only trainable groups
and logprobs still match; a tensor dropped on one engine rank and duplicated on another stops every rank
with one error naming both; an episode's prompts split across the engines, rewards scored on each engine's lead.
"""

from __future__ import annotations

import time

import torch

OVERRIDES = ["model.preset=tiny", "parallel.tensor=2", "parallel.pipeline=2"]
ROLLOUT_TP = 2
DROPPED = "model.language_model.layers.1.self_attn.k_proj.weight"  # dropped on rank 3 (engine 1, TP rank 1)
DUPLICATED = "model.language_model.layers.0.mlp.up_proj.weight"  # duplicated on rank 0 (engine 0, TP rank 0)


def _engine_logprobs(engine, prompt, image, response) -> list[float]:
    return engine.score(prompt, [image], response)


def spmd_engines(workdir: str) -> dict:
    """Runs on every rank; returns this rank's measurements (plain lists)."""
    import torch.distributed as dist

    from megatron_r1v3.bridge.mapping import to_hf
    from megatron_r1v3.data.template import encode_prompt_for_vllm, expand_image_tokens, image_token_ids
    from megatron_r1v3.data.tiling import TilingConfig, num_tiles
    from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.parallel.phase import set_phase
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rl.scoring import RewardScorer
    from megatron_r1v3.rollout import spmd_refit
    from megatron_r1v3.rollout.engine_group import EngineLayout, generate_split, start_engine, write_dummy_model_dir
    from megatron_r1v3.rollout.hf_export import ServingSettings
    from megatron_r1v3.rollout.refit import RefitError, push_weights
    from megatron_r1v3.rollout.spmd_refit import EngineRefit, iter_engine_tensors, plan_refit
    from megatron_r1v3.training.freeze import apply_trainable
    from tests.rollout.test_vllm_refit import _image, _megatron_logprobs

    cfg = load_config(None, OVERRIDES)
    init_parallel(cfg)
    rank, model = dist.get_rank(), cfg.model
    chunks = build_model(cfg)
    apply_trainable(chunks, "freeze_vision")
    layout = EngineLayout(dist.get_world_size(), ROLLOUT_TP)
    out: dict = {"engine": layout.engine_of(rank)}
    set_phase("dummy model dir")
    model_dir = f"{workdir}/vllm-dummy"
    if rank == 0:
        tok_dir = toy_tokenizer(f"{workdir}/tokenizer-cache")
        write_dummy_model_dir(model_dir, model, tok_dir, torch.float32, ServingSettings(max_tiles=6))
        out["dir_files"] = sorted(p.name for p in __import__("pathlib").Path(model_dir).iterdir())
    dist.barrier()
    set_phase("start engines")
    t0 = time.perf_counter()
    engine = start_engine(layout, model_dir, max_model_len=512, seed=0, dtype="fp32", load_format="dummy",
                          kv_cache_bytes=64 * 2**20, max_num_seqs=16)
    out["start_seconds"] = time.perf_counter() - t0
    dist.barrier()

    set_phase("prompt")
    tokenizer = load_tokenizer(model_dir)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    image = _image(112, 56, seed=1)
    tiling = TilingConfig(tile_size=model.vision.image_size, max_tiles=6)
    prompt = encode_prompt_for_vllm(tokenizer, "What is shown?", 1)
    train_prompt = expand_image_tokens(prompt, [num_tiles(image.width, image.height, tiling)],
                                       model.tokens_per_tile, image_token_ids(tokenizer))
    response = tokenizer.encode("Let me look.\n</think>\n\nThe answer is \\boxed{A}.<|im_end|>",
                                add_special_tokens=False)
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].float()
    out["before"] = _engine_logprobs(engine, prompt, image, response)

    set_phase("first refit")
    spmd_refit.POISON_UNSENT = True
    refit = EngineRefit(chunks, model, bucket_mb=1, engine_tp=ROLLOUT_TP, sliced=True)
    out["sliced"] = len(refit.sliced)
    out["sliced_hf_bytes"] = sum(t.numel() * t.element_size() for m in refit.manifests for name, shape, dtype, _ in m
                                 if name in refit.sliced
                                 for _, t in to_hf(name, torch.empty(shape, dtype=dtype, device="meta"), model,
                                                   spmd_refit.LAYOUT))
    engine.sleep(level=1)  # the GPU choreography; no-ops on CPU, recorded
    engine.wake_up(["weights"])
    dist.barrier()
    first = refit(engine, chunks, label=f"engine {out['engine']} rank {rank}: ")
    engine.wake_up(["kv_cache"])
    out["first"] = first.as_dict()
    set_phase("megatron forward 1")
    out["megatron_1"] = _megatron_logprobs(cfg, chunks, train_prompt + response, pixels, len(response)).tolist()
    out["after_1"] = _engine_logprobs(engine, prompt, image, response)

    set_phase("change trainable weights")
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                if p.requires_grad:
                    p.mul_(1.05)
    out["megatron_2"] = _megatron_logprobs(cfg, chunks, train_prompt + response, pixels, len(response)).tolist()
    plan = refit.plan()
    out["second_names"] = sorted(plan.expected)
    dist.barrier()
    refit.transport = "collective"  # shard broadcasts over the pipeline group instead of the shared-memory mirrors
    second = refit(engine, chunks, label=f"engine {out['engine']} rank {rank}: ")
    out["second"] = second.as_dict()
    out["after_2"] = _engine_logprobs(engine, prompt, image, response)
    out["events"] = list(engine.events)

    set_phase("faulty refit")
    full = plan_refit(refit.manifests, model, full=True)
    stream = iter_engine_tensors(chunks, refit.manifests, full, model)
    if rank == 3:
        stream = ((n, t) for n, t in stream if n != DROPPED)
    elif rank == 0:
        stream = (x for n, t in stream for x in ([(n, t)] * (2 if n == DUPLICATED else 1)))
    try:
        push_weights(engine, stream, full.expected, 2**20, agree=True, label=f"engine {out['engine']}: ")
        out["faulty"] = "no error"
    except RefitError as exc:
        out["faulty"] = str(exc)

    set_phase("episode split across engines")
    scorer = RewardScorer(workers=0)
    questions = [encode_prompt_for_vllm(tokenizer, f"Question {i}: what colour?", 1) for i in range(5)]
    prompts = [(q, [_image(56 + 8 * i, 56, seed=10 + i)]) for i, q in enumerate(questions)]

    def score_share(share, outs):  # on each engine's lead: its own prompts' rewards
        return [[s.total for s in scorer.score([x.text for x in samples], ["A"] * len(samples))]
                for samples in outs]

    split = generate_split(engine, layout, prompts, seeds=[1000 + 7 * i for i in range(5)], on_lead=score_share,
                           n=2, temperature=1.0, max_tokens=6)
    out["split_counts"] = split.prompts_per_engine
    out["split_tokens"] = [[s.token_ids for s in samples] for samples in split.samples]
    out["split_logprobs"] = [[s.logprobs for s in samples] for samples in split.samples]
    out["split_rewards"] = split.extra
    # the same prompts on this rank's engine alone: the split must not change what a prompt gets
    own = engine.generate(prompts, n=2, temperature=1.0, max_tokens=6, seed=[1000 + 7 * i for i in range(5)])
    out["own_tokens"] = [[s.token_ids for s in samples] for samples in own]

    set_phase("verifier beside the SPMD engine")
    # rl.verifier_model with SPMD engines: a judge engine at the policy engine's TP, in the same processes (vLLM's
    # groups are per process). Every sample is taken as one the rule check marked wrong on a boxed answer.
    from megatron_r1v3.rl.prompts import Prompt
    from megatron_r1v3.rl.rewards import RewardBreakdown
    from megatron_r1v3.rl.spmd_rollouts import judge_split
    from megatron_r1v3.rl.verifier import EngineVerifier
    from megatron_r1v3.rollout.hf_export import write_vllm_model_dir

    if rank == 0:
        write_vllm_model_dir(f"{workdir}/judge", model, tok_dir, torch.float32, seed=3, max_tiles=4)
    dist.barrier()
    judge = EngineVerifier(f"{workdir}/judge", max_model_len=512, kv_cache_mb=32, world=engine.world)
    rl_prompts = [Prompt(i, f"p{i}", f"Question {i}: what colour?", "A", None, ids, imgs)
                  for i, (ids, imgs) in enumerate(prompts)]
    split.extra = [([RewardBreakdown(0.2, 0.0, 1.0, "B") for _ in samples], None) for samples in split.samples]
    judged = judge_split(judge, layout, rl_prompts, split, w_acc=0.8)
    out["judged"] = [[list(ik), v] for ik, v in judged]
    out["judge_calls"] = judge.calls
    out["judged_accuracy"] = [[sc.accuracy for sc in scores] for scores, _ in split.extra]

    class SaysYes:  # the tiny random judge rarely answers yes: this one always does, to pin how verdicts apply
        calls = 0

        def judge(self, items):
            self.calls += len(items)
            return [True] * len(items)

    yes = SaysYes()
    split.extra = [([RewardBreakdown(0.2, 0.0, 1.0, "B") for _ in samples], None) for samples in split.samples]
    judge_split(yes, layout, rl_prompts, split, w_acc=0.8)
    out["yes_calls"] = yes.calls
    out["yes_scores"] = [[(sc.total, sc.accuracy) for sc in scores] for scores, _ in split.extra]

    class Down(SaysYes):  # a judge that fails on every rank (so no rank is left waiting in the verdicts' gather)
        def judge(self, items):
            raise ConnectionError("judge unreachable")

        def __repr__(self):
            return "Down()"

    from megatron_r1v3.rl.rewards import VerifierError

    split.extra = [([RewardBreakdown(0.2, 0.0, 1.0, "B") for _ in samples], None) for samples in split.samples]
    try:
        judge_split(Down(), layout, rl_prompts, split, w_acc=0.8)
        out["down"] = "no error"
    except VerifierError as err:
        out["down"] = str(err)
    item = judge.prompt_ids("What colour?", "</think>\\boxed{B}", "A")
    out["judge_tokens"] = judge.engine.generate([(item, [])], n=1, temperature=0.0, max_tokens=6)[0][0].token_ids
    again = engine.generate(prompts, n=2, temperature=1.0, max_tokens=6, seed=[1000 + 7 * i for i in range(5)])
    out["tokens_beside_judge"] = [[s.token_ids for s in samples] for samples in again]
    dist.barrier()
    judge.close()
    engine.close()
    return out


def refit_then_spmd(workdir: str) -> dict:
    """The in-process engine checks in one 4-rank launch (their start-ups shared), each after the previous one's
    engines have shut down in these same processes: the rank-0 engine's refit (`test_vllm_refit.refit_worker`), the
    SPMD engines (`spmd_engines`: megatron's groups rebuilt, vLLM's world built anew at TP2), then on rank 0 the
    policy and verifier engines side by side (`test_verifier.two_engines_worker`, vLLM at TP1 again)."""
    import torch.distributed as dist

    from tests.rollout.test_verifier import two_engines_worker
    from tests.rollout.test_vllm_refit import refit_worker

    out = {"refit": refit_worker(f"{workdir}/refit"), "spmd": spmd_engines(f"{workdir}/spmd")}
    if dist.get_rank() == 0:
        out["verifier"] = two_engines_worker(f"{workdir}/verifier")
    return out
