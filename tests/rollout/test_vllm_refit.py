"""Megatron (TP2·PP2, 4 gloo ranks) -> in-process vLLM on rank 0: refit, then vLLM's logprobs of a fixed response
to a prompt with an image must equal Megatron's; a dropped or duplicated tensor must be named by the manifest;
vLLM's tiling must give as many image tokens as ours, and pixels within the documented resize tolerance of ours.
Needs vLLM (the vLLM venv, see docs/rollout.md)."""

from __future__ import annotations

import io

import pytest
import torch

try:
    import vllm  # noqa: F401

    _NO_VLLM = ""
except Exception as exc:  # ImportError, or a broken install (torchvision CUDA wheel without the fix-up)
    _NO_VLLM = f"vLLM not importable ({type(exc).__name__}: {exc}); install it per docs/rollout.md"

pytestmark = [pytest.mark.multiprocess, pytest.mark.skipif(bool(_NO_VLLM), reason=_NO_VLLM or "ok")]

# the tiny preset's decoder head dim is 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...
OVERRIDES = ["model.preset=tiny", "parallel.tensor=2", "parallel.pipeline=2"]
MAX_TILES = 6
DROPPED = "model.language_model.layers.1.self_attn.k_proj.weight"
DUPLICATED = "model.vision_tower.encoder.layer.0.mlp.fc1.bias"
FP32 = 1e-5  # logprob bound: fp32 on both sides; measured 4.8e-7 (docs/performance.md)
# transformers' bicubic resize (the pixels vLLM and the RL trainer use) vs our Pillow tiling, in grey levels of 255;
# measured mean <= 0.23, max 7 (tall images), 1 where only the thumbnail is resized (docs/performance.md)
PIXEL_MEAN_LEVELS, PIXEL_MAX_LEVELS = 0.5, 10.0


def _image(width: int, height: int, seed: int):
    """An RGB test image decoded through the project's own decoder (PNG bytes -> data.decode_pillow.open_rgb)."""
    import numpy as np
    from PIL import Image

    from megatron_r1v3.data.decode_pillow import open_rgb

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return open_rgb(buf.getvalue())


def _pixel_levels(theirs: torch.Tensor, ours: torch.Tensor, std: tuple) -> dict:
    """Tile counts of both and, when equal, the mean / max |difference| in grey levels (normalisation undone)."""
    out = {"tiles": (int(theirs.shape[0]), int(ours.shape[0]))}
    if theirs.shape == ours.shape:
        levels = ((theirs.float() - ours) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
        out.update(mean=float(levels.mean()), max=float(levels.max()))
    return out


def _megatron_logprobs(cfg, chunks, ids: list[int], pixels: torch.Tensor, k: int) -> torch.Tensor:
    """Logprobs of the last `k` tokens of `ids` under the Megatron model, known on every rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_r1v3.training.step import forward_logits

    x = torch.tensor([ids])
    batch = {"input_ids": x, "labels": x, "loss_mask": torch.ones_like(x, dtype=torch.float32),
             "pixel_values": pixels}
    logits = forward_logits(chunks, [batch], cfg.model.language.vocab_size)
    out = torch.zeros(k, dtype=torch.float32)
    if logits is not None:
        logp = torch.log_softmax(logits[0][0].float(), dim=-1)
        n = len(ids)
        out = logp[n - k - 1 : n - 1].gather(1, x[0, n - k :].unsqueeze(1)).squeeze(1)
    dist.broadcast(out, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return out


def refit_worker(workdir: str) -> dict:
    """Runs on every rank; rank 0 hosts the engine and returns the measurements."""
    import torch.distributed as dist

    from megatron_r1v3.bridge.export import iter_hf_tensors
    from megatron_r1v3.bridge.mapping import expected_hf_names
    from megatron_r1v3.data.template import encode_prompt_for_vllm, expand_image_tokens, image_token_ids
    from megatron_r1v3.data.tiling import TilingConfig, num_tiles, tile_image_pillow
    from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel
    from megatron_r1v3.parallel.phase import set_phase
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.rollout.engine import RolloutEngine
    from megatron_r1v3.rollout.hf_export import write_vllm_model_dir
    from megatron_r1v3.rollout.refit import RefitError, push_weights

    cfg = load_config(None, OVERRIDES)
    init_parallel(cfg)
    rank = dist.get_rank()
    model = cfg.model
    chunks = build_model(cfg)
    manifest = list(expected_hf_names(model, "native"))
    tok_dir = toy_tokenizer(f"{workdir}/tokenizer-cache") if rank == 0 else None
    engine, out = None, {}
    if rank == 0:
        set_phase("write vLLM dir + start engine")
        model_dir = write_vllm_model_dir(f"{workdir}/vllm-model", model, tok_dir, torch.float32, seed=123,
                                         max_tiles=MAX_TILES)
        engine = RolloutEngine(model_dir, max_model_len=512, seed=0)
        out["start_seconds"] = engine.start_seconds
    dist.barrier()
    set_phase("prepare prompt")
    objs = [str(tok_dir) if rank == 0 else None, f"{workdir}/vllm-model"]
    dist.broadcast_object_list(objs, src=0)
    tokenizer = load_tokenizer(objs[0])
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(objs[1], local_files_only=True)
    image = _image(112, 56, seed=1)  # 2x1 grid + thumbnail = 3 tiles
    tiling = TilingConfig(tile_size=model.vision.image_size, max_tiles=MAX_TILES)
    prompt = encode_prompt_for_vllm(tokenizer, "What is shown?", 1)
    tiles = [num_tiles(image.width, image.height, tiling)]
    train_prompt = expand_image_tokens(prompt, tiles, model.tokens_per_tile, image_token_ids(tokenizer))
    response = tokenizer.encode("Let me look.\n</think>\n\nThe answer is \\boxed{A}.<|im_end|>",
                                add_special_tokens=False)
    # vLLM tiles with the HF processor (torchvision bicubic); feed Megatron the very same pixels.
    pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"].float()
    ours = tile_image_pillow(image, tiling)
    if rank == 0:
        out["pixels"] = [((image.width, image.height), _pixel_levels(pixels, ours, tiling.std))]
        out["before"] = torch.tensor(engine.score(prompt, [image], response))
        out["expanded_equal"] = engine.expanded_prompt(prompt, [image]) == train_prompt
        out["tile_checks"] = []
        for w, h in [(56, 56), (112, 56), (56, 168), (200, 90), (300, 300), (640, 100)]:
            imgs = [_image(w, h, seed=2), _image(h, w, seed=3)]
            p2 = encode_prompt_for_vllm(tokenizer, "Compare.", 2)
            n = [num_tiles(i.width, i.height, tiling) for i in imgs]
            want = expand_image_tokens(p2, n, model.tokens_per_tile, image_token_ids(tokenizer))
            out["tile_checks"].append(((w, h), n, engine.expanded_prompt(p2, imgs) == want))
            for i in imgs:
                theirs = processor.image_processor(images=[i], return_tensors="pt")["pixel_values"]
                out["pixels"].append(((i.width, i.height), _pixel_levels(theirs, tile_image_pillow(i, tiling),
                                                                         tiling.std)))

    set_phase("refit")
    dist.barrier()  # time the push itself, not rank 0's checks above
    # both transports: point-to-point (gloo gather + send) in small buckets; then the weights change and the
    # shared-memory transport (the default on one host) pushes them in one bucket
    stats = push_weights(engine, iter_hf_tensors(chunks, model, "native", transport="p2p"), manifest,
                         bucket_bytes=256 * 2**10)
    set_phase("megatron forward")
    out["megatron_p2p"] = _megatron_logprobs(cfg, chunks, train_prompt + response, pixels, len(response))
    if rank == 0:
        out["after_p2p"] = torch.tensor(engine.score(prompt, [image], response))
    with torch.no_grad():
        for chunk in chunks:
            for p in chunk.parameters():
                p.mul_(1.05)
    want = _megatron_logprobs(cfg, chunks, train_prompt + response, pixels, len(response))
    dist.barrier()
    one_bucket = push_weights(engine, iter_hf_tensors(chunks, model, "native", transport="shm"), manifest,
                              bucket_bytes=2**30)
    if rank == 0:
        out["stats"] = stats.as_dict()
        out["stats_one_bucket"] = one_bucket.as_dict()
        out["megatron"] = want
        out["after"] = torch.tensor(engine.score(prompt, [image], response))
        sample = engine.generate([(prompt, [image])], n=2, temperature=1.0, max_tokens=12, seed=0)[0][0]
        out["sample_vs_score"] = float((torch.tensor(sample.logprobs)
                                        - torch.tensor(engine.score(prompt, [image], sample.token_ids))).abs().max())
    # the same stream with one tensor dropped, then with one duplicated: every rank must name it
    for tag, name in (("dropped", DROPPED), ("duplicated", DUPLICATED)):
        set_phase(f"refit with a {tag} tensor")
        stream = iter_hf_tensors(chunks, model, "native")
        if tag == "dropped":
            stream = ((n, t) for n, t in stream if n != name)
        else:
            stream = (x for n, t in stream for x in ([(n, t)] * (2 if n == name else 1)))
        try:
            push_weights(engine, stream, manifest, bucket_bytes=256 * 2**10)
            out[tag] = "no error"
        except RefitError as exc:
            out[tag] = str(exc)
    dist.barrier()
    if engine is not None:
        engine.close()
    # plain lists: tensors cross the result queue as shared-memory fds, which die with the rank process
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


@pytest.fixture(scope="module")
def refit_run(four_rank_engines) -> dict:
    """Rank 0's refit results, from the 4-rank launch shared with test_spmd_engines.py (tests/rollout/conftest.py)."""
    return four_rank_engines[0]["refit"]


def test_logprobs_match_megatron_after_refit(refit_run):
    r = refit_run
    after, before, want = (torch.tensor(r[k]) for k in ("after", "before", "megatron"))
    diff, before = float((after - want).abs().max()), float((before - want).abs().max())
    p2p, want_p2p = torch.tensor(r["after_p2p"]), torch.tensor(r["megatron_p2p"])
    diff_p2p = float((p2p - want_p2p).abs().max())
    print(f"\nstart {r['start_seconds']:.1f}s; refit {r['stats']}; one bucket {r['stats_one_bucket']}; "
          f"max |logprob diff| shm {diff:.2e}, p2p {diff_p2p:.2e} (before refit {before:.2f}); "
          f"sample-vs-score {r['sample_vs_score']:.2e}")
    assert diff_p2p <= FP32  # the point-to-point transport
    assert float((want - want_p2p).abs().max()) > 1e-2  # the weights changed before the shared-memory push
    assert before > 1e-2, "the engine started with the trainer's weights already; the test proves nothing"
    assert diff <= FP32  # the shared-memory transport (the default on one host)
    assert r["sample_vs_score"] <= FP32
    assert r["stats"]["buckets"] > 1


def test_manifest_names_dropped_and_duplicated_tensor(refit_run):
    assert DROPPED in refit_run["dropped"] and "missing" in refit_run["dropped"]
    assert DUPLICATED in refit_run["duplicated"] and "twice" in refit_run["duplicated"]


def test_vllm_tiling_matches_ours(refit_run):
    r = refit_run
    print()
    for size, p in r["pixels"]:
        print(f"pixels {size}: tiles {p['tiles']}, vs our Pillow tiling mean {p.get('mean', -1):.3f} max "
              f"{p.get('max', -1):.1f} levels")
    assert len(r["pixels"]) == 13
    for size, p in r["pixels"]:  # the pixels, not only the tile counts
        assert p["tiles"][0] == p["tiles"][1], (size, p)
        assert p["mean"] <= PIXEL_MEAN_LEVELS and p["max"] <= PIXEL_MAX_LEVELS, (size, p)
    assert r["expanded_equal"]
    bad = [c for c in r["tile_checks"] if not c[2]]
    assert not bad, f"vLLM expanded these images to a different number of tokens: {bad}"
