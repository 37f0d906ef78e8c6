"""The trainer's pixels: a byte-bounded LRU tile cache, each prompt tiled once per episode for this DP rank's rows,
and no tiling at all off the first pipeline stage (only stage 0 feeds pixels to the model)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from megatron_r1v3.parallel.spawn import run_distributed
from megatron_r1v3.presets import load_config
from megatron_r1v3.rl.batch import Rollout, episode_microbatches
from megatron_r1v3.rl.rollouts import PixelSource, TileCache

CFG = load_config(None, ["model.preset=tiny"])
M = CFG.model


def _tiles(n: int, fill: float = 0.0) -> torch.Tensor:
    return torch.full((n, 25), fill)  # 100 bytes per tile (float32)


def test_tile_cache_stays_in_its_byte_budget_evicting_least_recently_used():
    cache = TileCache(max_bytes=400)

    def check(keys):
        assert list(cache._items) == keys  # least recently used first
        assert cache.bytes == sum(TileCache.size(cache._items[k]) for k in keys) <= cache.max_bytes

    cache.put(1, _tiles(1))
    cache.put(2, _tiles(2))
    check([1, 2])
    assert torch.equal(cache[1], _tiles(1))  # a hit makes 1 the most recent
    check([2, 1])
    cache.put(3, _tiles(1))
    check([2, 1, 3])
    cache.put(4, _tiles(1))  # 500 bytes would not fit: the least recent (2, 200 bytes) goes
    check([1, 3, 4])
    cache.put(5, None)  # a text-only prompt costs nothing
    check([1, 3, 4, 5])
    cache.put(3, _tiles(3))  # replaced by a bigger value: 1 + 4 + 3 = 500 bytes, so 1 goes
    check([4, 5, 3])
    cache.put(6, _tiles(5))  # larger than the whole budget: not kept, nothing evicted for it
    check([4, 5, 3])
    assert 6 not in cache and len(cache) == 3
    empty = TileCache(max_bytes=0)
    empty.put(1, _tiles(1))
    assert 1 not in empty and empty.bytes == 0


def _state(dp_rank: int = 0, dp: int = 2, first_stage: bool = True):
    return SimpleNamespace(dp_rank=dp_rank, dp=dp, is_first_stage=first_stage,
                           layout=SimpleNamespace(seq_multiple=1))


def _row(prompt: int, tiles: int, response: int = 3) -> Rollout:
    ids = [1] + [M.image_context_token_id] * (tiles * M.tokens_per_tile) + [7, 8]
    return Rollout(prompt, ids, [20 + i for i in range(response)], [-0.5] * response, 1.0, 1.0, 1.0, "stop", 0)


class Counting:
    """pixels_of(prompt) with a call counter: prompt p has p + 1 tiles filled with p."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, index: int) -> torch.Tensor:
        self.calls.append(index)
        return torch.full((index + 1, 3, 4, 4), float(index))


def test_a_prompt_is_tiled_once_per_episode_for_this_dp_ranks_rows():
    # G = 4 rows per prompt, groups contiguous (as episodes are); DP2 deals contiguous blocks: rank 0 gets prompts
    # 0 and 1, rank 1 prompts 2 and 3, so a group's rows never straddle ranks
    rows = [_row(p, p + 1) for p in range(4) for _ in range(4)]
    pixels = Counting()
    mbs = episode_microbatches(rows, _state(dp_rank=0), 2, M, pixels, step=0)
    assert sorted(pixels.calls) == [0, 1]
    assert len(mbs) == 4
    for i, mb in enumerate(mbs):  # two rows of one prompt per microbatch: its tiles once, shared by both rows
        p = i // 2
        assert mb["pixel_values"][:, 0, 0, 0].tolist() == [float(p)] * (p + 1), i
        assert mb["image_set_of_row"].tolist() == [0, 0] and mb["image_set_tiles"].tolist() == [p + 1], i
    unshared = episode_microbatches(rows, _state(dp_rank=0), 2, M, pixels, step=0, share_vision=False)
    assert [mb["pixel_values"].shape[0] for mb in unshared] == [2, 2, 4, 4]  # every row its own copy
    assert all("image_set_of_row" not in mb for mb in unshared)
    pixels.calls.clear()
    episode_microbatches(rows, _state(dp_rank=1), 2, M, pixels, step=0)
    assert sorted(pixels.calls) == [2, 3]


def test_mixed_microbatch_maps_each_row_to_its_set():
    rows = [_row(1, 2), _row(0, 1), _row(1, 2), _row(2, 0)]  # prompt 2 has no image
    pixels = Counting()
    mbs = episode_microbatches(rows, _state(dp_rank=0, dp=1), 4, M, lambda i: None if i == 2 else pixels(i), step=0)
    mb = mbs[0]
    assert mb["image_set_of_row"].tolist() == [0, 1, 0, -1] and mb["image_set_tiles"].tolist() == [2, 1]
    assert mb["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_ranks_off_the_first_stage_do_not_tile():
    rows = [_row(p, p + 1) for _ in range(2) for p in range(3)]

    def never(index: int):
        raise AssertionError(f"prompt {index} tiled on a later pipeline stage")

    mbs = episode_microbatches(rows, _state(dp_rank=0, dp=1, first_stage=False), 2, M, never, step=0)
    assert len(mbs) == 3 and all("pixel_values" not in mb for mb in mbs)
    assert mbs[0]["input_ids"][0].tolist()[:3] == [1, M.image_context_token_id, M.image_context_token_id]


def test_first_stage_checks_the_engines_image_tokens_against_its_tiles():
    rows = [_row(0, 1), _row(1, 5)]  # prompt 1's engine ids say 5 tiles, the trainer's tiling gives 2
    with pytest.raises(ValueError, match="prompt 1: .* 20 image tokens but the trainer's tiling gives 8"):
        episode_microbatches(rows, _state(dp_rank=0, dp=1), 2, M, Counting(), step=0)
    episode_microbatches(rows, _state(dp_rank=0, dp=1, first_stage=False), 2, M, Counting(), step=0)  # no tiles


def _pixel_source(cache_mb: int) -> PixelSource:
    """The real PixelSource (the engine's image processor, the LRU cache) on two synthetic images; prompt 2 is
    text-only."""
    cfg = load_config(None, ["model.preset=tiny", f"rl.pixel_cache_mb={cache_mb}"])
    px = PixelSource(cfg, samples=[], tokenizer=None)
    images = {0: [Image.new("RGB", (64, 32), (200, 10, 10))], 1: [Image.new("RGB", (40, 40), (10, 200, 10))], 2: []}
    px.prompt = lambda index: SimpleNamespace(images=images[index])
    processor, px.processor_calls = px.processor, 0

    def counted(**kwargs):
        px.processor_calls += 1
        return processor(**kwargs)

    px.processor = counted
    return px


def test_pixel_source_tiles_each_prompt_once_per_episode_even_without_a_cache():
    px = _pixel_source(cache_mb=0)
    tiles = {i: px(i) for i in range(3)}
    assert px.processor_calls == 2 and px.cache.bytes == 0 and tiles[2] is None
    rows = [_row(p, 0 if tiles[p] is None else tiles[p].shape[0]) for _ in range(8) for p in range(3)]
    mbs = episode_microbatches(rows, _state(dp_rank=0, dp=1), 4, M, px, step=0)
    assert px.processor_calls == 2 + 2  # 24 rows, 2 prompts with images: each tiled once in this episode
    expected = torch.cat([tiles[r.prompt_index] for r in rows if tiles[r.prompt_index] is not None])
    per_row = []  # every row's tiles, read back through the microbatch's group-shared sets
    for mb in mbs:
        sets = torch.split(mb["pixel_values"], mb["image_set_tiles"].tolist())
        per_row += [sets[k] for k in mb["image_set_of_row"].tolist() if k >= 0]
        assert mb["pixel_values"].shape[0] == sum(t.shape[0] for t in tiles.values() if t is not None)  # each once
    assert torch.equal(torch.cat(per_row), expected)


def test_pixel_source_cache_reuses_tiles_across_episodes_within_budget():
    px = _pixel_source(cache_mb=1)
    first = px(0)
    assert px(0) is first and px.tiled == px.processor_calls == 1
    assert px.cache.bytes == first.numel() * 4 <= 2**20
    px(1), px(2), px(1)
    assert px.tiled == 3 and px.processor_calls == 2 and len(px.cache) == 3


def test_pipeline_stage_zero_alone_tiles_and_logits_are_unchanged_at_pp2():
    first, last = run_distributed("tests.rl.pixel_workers:pp2_pixels_on_the_first_stage_only", 2, timeout_s=240)
    assert first["stage"] == 0 and first["tiled"] == [0, 1, 2] and all(first["pixels"])
    assert last["stage"] == 1 and last["tiled"] == [] and not any(last["pixels"])
    assert last["same"] and last["finite"] and last["pixels_matter"]


def test_blank_images_keep_the_prompt_and_its_size_and_drop_what_the_image_shows(tmp_path):
    """The blind control (`r1v3 eval --blank-images`): same ids, same image size and tile count, white pixels."""
    from megatron_r1v3.data.synthetic import generate_split
    from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer
    from megatron_r1v3.rl.prompts import BLANK_RGB, make_prompt

    tok = load_tokenizer(toy_tokenizer(tmp_path / "tok"))
    samples = generate_split(tmp_path, "val", 2, seed=1, tasks=("colour_word",))
    cfg = load_config(None, ["model.preset=tiny"])
    seen, blind = PixelSource(cfg, samples, tok), PixelSource(cfg, samples, tok, blank_images=True)
    for i in range(2):
        real, blank = seen.prompt(i), blind.prompt(i)
        assert real.prompt_ids == blank.prompt_ids and real.answer == blank.answer
        assert [im.size for im in real.images] == [im.size for im in blank.images]
        assert {c for im in blank.images for _, c in im.getcolors()} == {BLANK_RGB}
        assert len({c for im in real.images for _, c in im.getcolors()}) > 1  # the real one shows a shape
        assert seen(i).shape == blind(i).shape and not torch.equal(seen(i), blind(i))
    assert make_prompt(samples[0], 0, tok, blank_images=True).images[0].size == (56, 56)
