"""SFT batches end to end on the toy task: fixed shapes, tile order, bad samples skipped and counted with file:line
(or raised in strict mode), data-parallel shards disjoint and complete, exact resume, packing boundaries."""

import io
import json
import logging
from collections import Counter

import pytest
import torch
from PIL import Image

from megatron_r1v3.data.decode_pillow import open_rgb
from megatron_r1v3.data.records import RecordError, RecordReader
from megatron_r1v3.data.sft_dataset import BadSampleError, SFTBatchIterator
from megatron_r1v3.data.synthetic import generate_toy_dataset
from megatron_r1v3.data.tiling import TilingConfig, denormalize_tiles, tile_image_pillow
from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer

TILING = TilingConfig(tile_size=56, max_tiles=4)
PER_TILE, SEQ = 4, 192
N_TOY = 20
GOOD = N_TOY + 2  # toy samples + a wide (3-tile) one + a two-image one
BAD = {"missing_image": 1, "corrupt_image": 1, "too_long": 1, "no_response": 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(toy_tokenizer(tmp_path_factory.getbasetemp() / "tokenizer-cache"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Toy train split plus hand-made records: multi-tile, two images, and one of each kind of bad sample."""
    toy = generate_toy_dataset(tmp_path_factory.mktemp("toy"), n_train=N_TOY, n_val=1, seed=2, image_size=56)
    root = toy.root
    wide = Image.new("RGB", (112, 56), (250, 250, 250))
    wide.paste((200, 30, 30), (0, 0, 56, 56))
    wide.save(root / "wide.png")
    jpeg = io.BytesIO()
    Image.new("RGB", (56, 56), (30, 70, 220)).save(jpeg, "JPEG", quality=95)
    (root / "corrupt.jpg").write_bytes(jpeg.getvalue()[:200])
    trace = "<think>\nI look at the image.\n</think>\n\nThe answer is \\boxed{A}."
    extra = [
        {"images": ["wide.png"], "question": "Which half is red?", "answer": "A", "response": trace, "id": "wide"},
        {"images": ["wide.png", "images/train/000000.png"], "question": "Compare.", "answer": "A", "response": trace},
        {"images": ["images/train/missing.png"], "question": "Q?", "answer": "A", "response": trace},
        {"images": ["corrupt.jpg"], "question": "Q?", "answer": "A", "response": trace},
        {"images": [], "question": "Q?", "answer": "A", "response": trace.replace("I look", "word " * 400)},
        {"images": ["wide.png"], "question": "Q?", "answer": "A"},
    ]
    with toy.train_jsonl.open("a", encoding="utf-8") as handle:
        handle.write("{not json\n")
        for record in extra:
            handle.write(json.dumps(record) + "\n")
    return toy.train_jsonl


def make(data, tok, **kw):
    args = dict(tiling=TILING, tokens_per_tile=PER_TILE, seq_length=SEQ, micro_batch_size=3, decoder="pillow")
    args.update(kw)
    return SFTBatchIterator.from_files(data, tok, **args)


def all_records(path):
    return list(RecordReader(path, strict=False, check_images=False))


def line_of(source: str) -> int:
    return int(source.rsplit(":", 1)[1])


def check_batch(batch, tok, b, s, records):
    """Shapes, label convention, and pixel_values in <IMG_CONTEXT> order equal to the Pillow reference tiles."""
    for key in ("input_ids", "labels", "loss_mask", "position_ids"):
        assert tuple(batch[key].shape) == (b, s)
    assert batch["loss_mask"].dtype == torch.float32
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert int((ids == 5).sum()) == batch["num_image_tokens"] == PER_TILE * batch["num_tiles"]
    assert not bool(mask[ids == 5].any()) and not bool(mask[ids == tok.pad_token_id].any())
    expected = []
    for source in batch["sample_sources"]:
        sample = records[line_of(source)]
        expected += [tile_image_pillow(open_rgb(p.read_bytes()), TILING) for p in sample.image_paths]
    assert batch["pixel_values"].shape[0] == batch["num_tiles"] == sum(t.shape[0] for t in expected)
    return torch.cat(expected) if expected else torch.empty(0, 3, 56, 56)


def test_one_epoch_end_to_end_with_bad_samples(data, tok, caplog):
    records = {line_of(s.source): s for s in all_records(data)}
    with caplog.at_level(logging.WARNING):
        it = make(data, tok, num_epochs=1)
        batches = list(it)
    seen = []
    for batch in batches:
        reference = check_batch(batch, tok, 3, SEQ, records)
        assert torch.equal(batch["pixel_values"], reference)  # Pillow decoder: bit-exact, in sample order
        for r, source in enumerate(batch["sample_sources"]):
            sample = records[line_of(source)]
            answer = sample.response[len("<think>\n") :] + "<|im_end|>"
            assert tok.decode(batch["labels"][r][batch["loss_mask"][r].bool()]) == answer
        seen += batch["sample_sources"]
    assert len(seen) == len(set(seen)) == GOOD and it.stats.samples == GOOD
    assert it.stats.skipped == Counter(BAD) and it.stats.skipped_records == Counter({"bad_json": 1})
    assert it.stats.consumed == it.samples_per_epoch() == GOOD + sum(BAD.values())
    assert batches[-1]["num_samples"] == GOOD % 3 and batches[-1]["input_ids"][GOOD % 3 :].eq(0).all()
    bad_lines = {21: "bad JSON", 24: "missing.png", 25: "corrupt.jpg", 26: "too_long", 27: "no_response"}
    for line, what in bad_lines.items():
        assert any(f"{data}:{line}" in m and what in m for m in caplog.messages), (line, caplog.messages)


def test_dali_decoder_gives_the_same_batches(data, tok):
    pytest.importorskip("nvidia.dali")
    pillow = list(make(data, tok, num_epochs=1))
    dali = list(make(data, tok, num_epochs=1, decoder="dali"))
    assert len(dali) == len(pillow)
    for a, b in zip(pillow, dali):
        for key in ("input_ids", "labels", "loss_mask"):
            assert torch.equal(a[key], b[key])
        diff = (denormalize_tiles(a["pixel_values"], TILING) - denormalize_tiles(b["pixel_values"], TILING)).abs()
        assert diff.mean() <= 1.0 and diff.max() <= 16


def test_strict_mode_raises_with_location(data, tok):
    with pytest.raises(RecordError, match=f"{data}:21"):
        make(data, tok, strict=True)
    samples = all_records(data)
    it = SFTBatchIterator(samples, tok, TILING, PER_TILE, SEQ, 3, decoder="pillow", strict=True, shuffle=False)
    with pytest.raises(BadSampleError) as info:
        list(it)
    assert info.value.location == f"{data}:24" and info.value.kind == "missing_image"


@pytest.mark.parametrize("dp_size", [2, 3])
def test_data_parallel_shards_are_disjoint_and_complete(data, tok, dp_size):
    shards, skipped = [], Counter()
    for rank in range(dp_size):
        it = make(data, tok, num_epochs=1, dp_rank=rank, dp_size=dp_size, micro_batch_size=2)
        shards.append([s for batch in it for s in batch["sample_sources"]])
        skipped += it.stats.skipped
        assert it.stats.consumed == it.samples_per_epoch()
    flat = [s for shard in shards for s in shard]
    assert len(flat) == len(set(flat)) == GOOD and skipped == Counter(BAD)
    assert max(map(len, shards)) - min(map(len, shards)) <= sum(BAD.values())


def test_order_depends_on_seed_only(data, tok):
    def order(seed):
        return [s for batch in make(data, tok, num_epochs=1, seed=seed) for s in batch["sample_sources"]]

    assert order(5) == order(5) != order(6)
    assert sorted(order(5)) == sorted(order(6))


@pytest.mark.parametrize("pack", [False, True])
def test_resume_is_exact(data, tok, pack):
    kw = dict(seed=9, dp_rank=1, dp_size=2, pack=pack, seq_length=400 if pack else SEQ, micro_batch_size=2)
    full = make(data, tok, **kw)
    first = [next(full) for _ in range(3)]
    state = json.loads(json.dumps(full.state_dict()))  # must survive a plain-JSON checkpoint
    rest = [next(full) for _ in range(8)]  # crosses into the next epoch
    resumed = make(data, tok, **kw)
    resumed.load_state_dict(state)
    again = [next(resumed) for _ in range(8)]
    assert state["consumed"] >= sum(b["num_samples"] for b in first) and state["batches"] == 3
    for a, b in zip(rest, again):
        assert a["sample_sources"] == b["sample_sources"]
        for key in ("input_ids", "labels", "loss_mask", "pixel_values", "position_ids", "cu_seqlens"):
            assert torch.equal(a[key], b[key]), key
    assert full.state_dict() == resumed.state_dict()
    with pytest.raises(ValueError, match="dp_size: saved 2, now 4"):
        make(data, tok, **{**kw, "dp_size": 4}).load_state_dict(state)


def test_packing_boundaries(data, tok):
    records = {line_of(s.source): s for s in all_records(data)}
    b, s = 2, 400
    batches = list(make(data, tok, num_epochs=1, pack=True, seq_length=s, micro_batch_size=b))
    total = 0
    for batch in batches:
        assert torch.equal(batch["pixel_values"], check_batch(batch, tok, b, s, records))
        cu = batch["cu_seqlens"].tolist()
        assert batch["cu_seqlens"].dtype == torch.int32 and cu[0] == 0 and cu[-1] == b * s
        assert batch["max_seqlen"] == max(y - x for x, y in zip(cu, cu[1:]))
        ids = batch["input_ids"].flatten()
        labels, mask = batch["labels"].flatten(), batch["loss_mask"].flatten()
        pos = batch["position_ids"].flatten()
        segments = [(x, y) for x, y in zip(cu, cu[1:]) if ids[x] != tok.pad_token_id]
        assert len(segments) == batch["num_samples"] and all(y - x <= s for x, y in segments)
        for x, y in segments:
            assert ids[x] == tok.bos_token_id and x // s == (y - 1) // s  # a sample starts a segment, stays in its row
            assert pos[x:y].tolist() == list(range(y - x))  # positions restart per sample
            assert torch.equal(labels[x : y - 1], ids[x + 1 : y]) and mask[y - 1] == 0  # no label crosses a boundary
            assert ids[y - 1] == tok.eos_token_id
        rows_used = [sum(1 for x, _ in segments if x // s == r) for r in range(b)]
        total += batch["num_samples"]
        assert max(rows_used) >= 2 or batch is batches[-1]  # rows really hold several samples
    assert total == GOOD
