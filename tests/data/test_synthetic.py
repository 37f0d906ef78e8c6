"""Toy task generator: determinism, answers re-derived from metadata and pixels, trace format, wrong_fraction,
reflection moves."""

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from megatron_r1v3.data.decode_pillow import decode_rgb
from megatron_r1v3.data.records import read_records
from megatron_r1v3.data.synthetic import (
    BACKGROUND,
    COLOURS,
    DEFAULT_TASKS,
    LETTERS,
    generate_split,
    generate_toy_dataset,
    reflection_moves,
    wrong_indices,
)
from megatron_r1v3.data.tiling import TilingConfig, tile_image_pillow

TRACE = re.compile(r"<think>\n(.+)\n</think>\n\nThe answer is \\boxed\{([^{}]+)\}\.", re.DOTALL)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return generate_toy_dataset(out, n_train=60, n_val=20, seed=3, wrong_fraction=0.25, parquet=True)


def all_files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate_toy_dataset(tmp_path / "a", n_train=15, n_val=5, seed=7, wrong_fraction=0.2, parquet=True)
    b = generate_toy_dataset(tmp_path / "b", n_train=15, n_val=5, seed=7, wrong_fraction=0.2, parquet=True)
    c = generate_toy_dataset(tmp_path / "c", n_train=15, n_val=5, seed=8, wrong_fraction=0.2)
    files_a, files_b = all_files(a.root), all_files(b.root)
    assert files_a == files_b and len(files_a) == 15 + 5 + 4 + 2  # images, {train,val}.{jsonl,parquet}, pretrain_*
    assert (tmp_path / "c" / "train.jsonl").read_bytes() != files_a[a.train_jsonl.relative_to(a.root)]
    assert c.train_parquet is None


def test_sample_depends_only_on_seed_split_and_index(tmp_path):
    short = generate_split(tmp_path / "s", "train", 5, seed=1)
    long = generate_split(tmp_path / "l", "train", 12, seed=1)
    assert [s.to_record() for s in short] == [s.to_record() for s in long[:5]]
    for s, t in zip(short, long):
        assert s.image_paths[0].read_bytes() == t.image_paths[0].read_bytes()


def expected_answer(meta):
    """Re-derive the right answer from the generator's facts, independently of its question code."""
    truth = {
        "colour_mc": meta.get("colour"),
        "shape_word": meta.get("shape"),
        "count_number": str(meta.get("count")),
        "count_mc": str(meta.get("count")),
        "digit_number": str(meta.get("digit")),
        "colour_word": meta.get("colour"),
    }[meta["task"]]
    if "options" in meta:
        assert len(meta["options"]) == 4 and len(set(meta["options"])) == 4
        return LETTERS[meta["options"].index(truth)]
    return truth


def count_blobs(mask):
    """4-connected components of a boolean mask (tiny images: plain flood fill)."""
    seen, blobs = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return blobs


def test_answers_follow_from_metadata_and_pixels(toy):
    samples = read_records(toy.train_jsonl) + read_records(toy.val_jsonl)
    assert Counter(s.meta["task"] for s in samples) == {t: 16 for t in DEFAULT_TASKS}
    for s in samples:
        assert s.answer == expected_answer(s.meta), s.source
        pixels = decode_rgb(s.load_images()[0])
        assert pixels.shape == (56, 56, 3)
        ink = np.any(pixels != BACKGROUND, axis=-1)
        if "colour" in s.meta:
            assert np.all(pixels[ink] == COLOURS[s.meta["colour"]]), s.source
        if "count" in s.meta:
            assert count_blobs(ink) == s.meta["count"], s.source
        if s.meta["task"] == "digit_number":
            assert ink.sum() > 20
        for letter, option in zip(LETTERS, s.meta.get("options", [])):
            assert f"\n{letter}. {option}\n" in s.question


def test_traces_have_the_exact_format_and_say_the_trace_answer(toy):
    for s in read_records(toy.train_jsonl) + read_records(toy.val_jsonl):
        match = TRACE.fullmatch(s.response)
        assert match, s.response
        reasoning, boxed = match.groups()
        assert reasoning.strip() and "\n\n" not in reasoning
        assert boxed == s.meta["trace_answer"]
        assert (boxed == s.answer) == s.meta["trace_correct"], s.source


def test_wrong_fraction_is_exact_deterministic_and_train_only(toy):
    train, val = read_records(toy.train_jsonl), read_records(toy.val_jsonl)
    wrong = [i for i, s in enumerate(train) if not s.meta["trace_correct"]]
    assert len(wrong) == 15  # round(60 * 0.25)
    assert set(wrong) == wrong_indices(60, 0.25, 3, "train")
    assert all(s.meta["trace_correct"] for s in val)
    assert wrong_indices(60, 0.0, 3, "train") == set()
    assert len(wrong_indices(60, 1.0, 3, "train")) == 60
    with pytest.raises(ValueError):
        wrong_indices(10, 1.5, 0, "train")


def test_parquet_matches_jsonl(toy):
    for jsonl, parquet in ((toy.train_jsonl, toy.train_parquet), (toy.val_jsonl, toy.val_parquet)):
        a, b = read_records(jsonl), read_records(parquet)
        assert [s.to_record() for s in a] == [s.to_record() for s in b]
        assert [s.load_images() for s in a] == [s.load_images() for s in b]


def test_images_tile_to_one_tile_at_the_tiny_preset(toy, tmp_path):
    sample = read_records(toy.val_jsonl)[0]
    tiles = tile_image_pillow(Image.open(sample.image_paths[0]), TilingConfig(tile_size=56))
    assert tiles.shape == (1, 3, 56, 56)
    jpeg = generate_toy_dataset(tmp_path, n_train=3, n_val=1, seed=0, image_size=64, image_format="jpeg")
    first = read_records(jpeg.train_jsonl)[0]
    assert first.images[0].endswith(".jpg") and decode_rgb(first.load_images()[0]).shape == (64, 64, 3)


def test_pretraining_captions_state_the_true_facts_traces_open_with_them(toy):
    from megatron_r1v3.data.records import RecordReader

    traces = list(RecordReader([toy.train_jsonl], root=toy.root))
    captions = list(RecordReader([toy.root / "pretrain_train.jsonl"], root=toy.root))
    assert len(traces) == len(captions) and [c.images for c in captions] == [t.images for t in traces]
    for t, c in zip(traces, captions):
        assert c.response.startswith("The image shows") and c.response == c.answer
        opening = t.response.split("\n")[1].split(".")[0] + "."
        assert (opening == c.response) == t.meta["trace_correct"], (t, c)


def test_colour_word_task(tmp_path):
    from megatron_r1v3.data.synthetic import generate_split

    samples = generate_split(tmp_path, "train", 12, seed=5, wrong_fraction=0.5, tasks=("colour_word",))
    for s in samples:
        assert s.answer == expected_answer(s.meta) and s.question.endswith("Answer with one word.")
        said = s.response.split("\\boxed{")[1].split("}")[0]
        assert (said == s.answer) == s.meta["trace_correct"]


def test_reflection_moves_fix_or_confirm_the_first_read_and_leave_other_traces_unchanged(tmp_path):
    tasks = ("colour_word", "shape_word")
    plain = generate_split(tmp_path / "a", "train", 40, seed=5, wrong_fraction=0.25, tasks=tasks)
    moved = generate_split(tmp_path / "b", "train", 40, seed=5, wrong_fraction=0.25, tasks=tasks, reflect_fraction=0.5)
    moves = reflection_moves(40, 0.5, 5, "train")
    assert len(moves) == 20 and Counter(moves.values()) == {"fix": 10, "confirm": 10}
    assert reflection_moves(40, 0.5, 5, "train") == moves and reflection_moves(40, 0.0, 5, "train") == {}
    with pytest.raises(ValueError, match="reflect_fraction"):
        reflection_moves(4, 1.5, 0, "train")
    for i, (a, b) in enumerate(zip(plain, moved)):
        assert a.images == b.images and a.answer == b.answer and a.meta["trace_answer"] == b.meta["trace_answer"]
        level = {"colour_word": 1, "shape_word": 2}[b.meta["task"]]
        assert b.meta.get("reflection") == moves.get(i) and level < b.meta["difficulty"] < level + 1
        reasoning = TRACE.fullmatch(b.response).group(1)
        sentences = reasoning.split(". ")
        first_read = a.response.split("\n")[1].split(". ")[0]  # the plain trace's read states the trace's answer
        if i not in moves:
            assert b.response == a.response
        elif moves[i] == "fix":  # a different first read, the move, then the plain trace
            assert sentences[0] != first_read and sentences[0].startswith("The image shows")
            assert sentences[1] == "Wait, let me look at the image again"
            assert reasoning.endswith(TRACE.fullmatch(a.response).group(1))
        else:  # the read, the move, "Yes," restating it
            assert sentences[0] == first_read and sentences[1] == "Hmm, let me look again to be sure"
            assert sentences[2] == "Yes, " + first_read[0].lower() + first_read[1:]


def test_difficulty_is_the_level_plus_the_blank_share_of_the_image():
    from megatron_r1v3.data.synthetic import difficulty

    blank, full = Image.new("RGB", (10, 10), BACKGROUND), Image.new("RGB", (10, 10), COLOURS["red"])
    half = Image.new("RGB", (10, 10), BACKGROUND)
    half.paste(COLOURS["blue"], (0, 0, 10, 5))
    assert difficulty("colour_word", full) == 1.0 and difficulty("colour_word", half) == 1.5
    assert difficulty("count_mc", blank) == 4.0 and difficulty("shape_word", half) == 2.5
