"""Benchmark files in the Hugging Face export layout (written by pyarrow itself, not by our writer), the R1V3 prompt
with listed options, the prompt-token budget (config default, validation, skip-and-count) and the `r1v3 eval`
flags. In-process, single rank, no vLLM (the eval run through vLLM is in tests/rollout/test_grpo.py)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_r1v3.cli import _eval_config, build_parser
from megatron_r1v3.config import ConfigError, field_errors, full_image_tokens, prompt_token_budget
from megatron_r1v3.data.benchmark import MC_INSTRUCTION, is_benchmark_file, parse_options, render_question
from megatron_r1v3.data.decode_pillow import open_rgb
from megatron_r1v3.data.records import RecordError, Sample, write_parquet
from megatron_r1v3.data.template import encode_prompt_for_training
from megatron_r1v3.data.tiling import TilingConfig, num_tiles
from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer
from megatron_r1v3.presets import load_config
from megatron_r1v3.rl.evaluate import in_scope
from megatron_r1v3.rl.prompts import load_prompts, make_prompt, prompt_tokens
from megatron_r1v3.rl.rewards import accuracy_reward
from megatron_r1v3.rl.rollouts import PixelSource, longest_response

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Parquet


def png(size: tuple[int, int], colour=(200, 30, 30), exif_orientation: int | None = None, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    if exif_orientation is None:
        img.save(buf, fmt)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(toy_tokenizer(tmp_path_factory.mktemp("tok")))


def mmmu_parquet(path: Path) -> list[bytes]:
    """MMMU-like: id, question, options (a Python-literal string), answer (letter), image_1/image_2 structs."""
    blobs = [png((56, 56)), png((112, 56), (10, 200, 10))]
    table = pa.table({
        "id": ["validation_Art_1", "validation_Math_2"],
        "question": ["Which colour is shown in <image 1>?", "What is 1/2 as a decimal?"],
        "options": ["['red', 'green', 'blue']", "[]"],
        "answer": ["A", "0.5"],
        "image_1": pa.array([{"bytes": blobs[0], "path": "a.png"}, {"bytes": blobs[1], "path": None}],
                            IMAGE_STRUCT),
        "image_2": pa.array([None, None], IMAGE_STRUCT),
        "question_type": ["multiple-choice", "open"],
    })
    pq.write_table(table, path)
    return blobs


def test_mmmu_style_parquet_with_embedded_image_structs(tmp_path, tokenizer):
    path = tmp_path / "mmmu.parquet"
    blobs = mmmu_parquet(path)
    assert is_benchmark_file(path)
    a, b = load_prompts([str(path)], None, strict=False)
    assert a.question == ("Which colour is shown in <image 1>?\nA. red\nB. green\nC. blue\n" + MC_INSTRUCTION)
    assert a.answer == "A" and a.meta == {"question_type": "multiple-choice", "options": ["red", "green", "blue"]}
    assert a.load_images() == [blobs[0]] and a.source == f"{path}:0" and a.id == "validation_Art_1"
    assert b.question == "What is 1/2 as a decimal?" and b.meta == {"question_type": "open"}
    assert b.load_images() == [blobs[1]]
    p = make_prompt(a, 0, tokenizer)
    assert p.options == ["red", "green", "blue"] and p.images[0].size == (56, 56)
    assert tokenizer.decode(p.prompt_ids).count("A. red") == 1
    # the chosen letter, or the option's text, is scored against the answer
    assert accuracy_reward("</think>\\boxed{A}", a.answer, p.options) == 1.0
    assert accuracy_reward("</think>\\boxed{red}", a.answer, p.options) == 1.0
    assert accuracy_reward("</think>\\boxed{B}", a.answer, p.options) == 0.0


def test_mathvista_style_parquet_and_jsonl(tmp_path, tokenizer):
    """MathVista-like: pid, choices (list or null), answer = the option's text, image path + decoded_image."""
    blob = png((56, 112))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "2.png").write_bytes(blob)
    table = pa.table({
        "pid": ["1", "2"],
        "question": ["How many dots?", "Is the bar taller than 3?"],
        "image": ["images/1.png", "images/2.png"],
        "decoded_image": pa.array([{"bytes": blob, "path": "1.png"}, None], IMAGE_STRUCT),
        "choices": pa.array([None, ["yes", "no"]], pa.list_(pa.string())),
        "answer": ["4", "no"],
        "question_type": ["free_form", "multi_choice"],
        "answer_type": ["integer", "text"],
    })
    pq.write_table(table, tmp_path / "mathvista.parquet")
    first, second = load_prompts([str(tmp_path / "mathvista.parquet")], None, strict=False)
    assert first.id == "1" and first.load_images() == [blob] and first.meta["answer_type"] == "integer"
    assert second.image_paths == [tmp_path / "images" / "2.png"] and second.answer == "no"
    assert second.question.splitlines()[1:3] == ["A. yes", "B. no"]
    assert accuracy_reward("</think>\\boxed{B}", second.answer, second.meta["options"]) == 1.0
    # JSONL: options as a JSON string, image as a path string, integer answer
    rows = [{"question": "Pick one", "options": json.dumps(["1", "2"]), "answer": 2, "image": "images/2.png"},
            {"question": "No image, free form", "answer": "x^2"}]
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    one, two = load_prompts([str(tmp_path / "bench.jsonl")], None, strict=False)
    assert one.meta["options"] == ["1", "2"] and one.answer == "2" and one.source == f"{tmp_path / 'bench.jsonl'}:1"
    assert two.images == [] and two.question == "No image, free form"


@pytest.mark.parametrize(("row", "message"), [
    ({"question": "q", "options": ["a", "b"]}, "missing field 'answer'"),
    ({"question": "q", "options": ["a", "b"], "answer": "C"}, "neither an option letter A-B"),
    ({"question": "q", "options": "a, b", "answer": "A"}, "neither a list nor"),
    ({"question": "q", "options": [str(i) for i in range(9)], "answer": "A"}, "9 options; at most 8"),
    ({"question": "q", "answer": "A", "question_type": "multi_choice"}, "question_type 'multi_choice' but no options"),
    ({"question": "q", "answer": "1", "image": "missing.png"}, "image 'missing.png' not found"),
    ({"question": "q", "answer": "1", "image": {"bytes": None, "path": None}}, "neither bytes nor a path"),
    ({"question": "", "answer": "1", "image": "x.png"}, "'question' must be a non-empty string"),
])
def test_bad_rows_name_file_and_row(tmp_path, row, message):
    good = {"question": "fine", "options": ["a", "b"], "answer": "b"}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(RecordError, match=f"{path}:2: .*{message}"):
        load_prompts([str(path)], None, strict=False)  # benchmarks are strict whatever data.strict says
    table = pa.Table.from_pylist([good, {**good, "answer": "Z"}])  # the same in Parquet, 0-based rows
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(RecordError, match=f"{tmp_path / 'bad.parquet'}:1: answer 'Z'"):
        load_prompts([str(tmp_path / "bad.parquet")], None, strict=False)


def test_our_record_files_are_not_taken_for_benchmarks(tmp_path):
    sample = Sample(question="q", answer="a", images=["x.png"], image_bytes=[png((8, 8))])
    write_parquet(tmp_path / "ours.parquet", [sample])
    (tmp_path / "ours.jsonl").write_text(json.dumps({"images": [], "question": "q", "answer": "a"}) + "\n")
    assert not is_benchmark_file(tmp_path / "ours.parquet") and not is_benchmark_file(tmp_path / "ours.jsonl")
    assert load_prompts([str(tmp_path / "ours.parquet")], None, strict=True)[0].answer == "a"


def test_option_parsing_and_rendering():
    assert parse_options("['a', 'b']") == parse_options('["a", "b"]') == parse_options(["a", "b"]) == ["a", "b"]
    assert parse_options([1, 2.5]) == ["1", "2.5"] and parse_options("") is None and parse_options([]) is None
    assert render_question("Q?", None) == "Q?"
    assert render_question("Q?", ["x", "y"]) == "Q?\nA. x\nB. y\n" + MC_INSTRUCTION


def test_prompt_tokens_equal_the_expanded_training_prompt(tmp_path, tokenizer):
    """The header-only count (EXIF orientation, the InternVL grid, thumbnail) equals the length of the prompt
    expanded from the decoded image's tiles."""
    model = load_config(None, ["model.preset=tiny"]).model
    tiling = TilingConfig(tile_size=model.vision.image_size, max_tiles=4, use_thumbnail=True)
    for blob in (png((224, 56)), png((224, 56), exif_orientation=6), png((40, 40)), png((300, 120), fmt="JPEG")):
        sample = Sample(question="What is shown?", answer="x", images=["i"], image_bytes=[blob, blob])
        tiles = [num_tiles(*open_rgb(blob).size, tiling)] * 2
        expanded = encode_prompt_for_training(tokenizer, sample.question, tiles, model.tokens_per_tile)
        assert prompt_tokens(sample, tokenizer, model, 4) == len(expanded)
    rotated = Sample(question="q", answer="x", images=["i"], image_bytes=[png((224, 56), exif_orientation=6)])
    flat = Sample(question="q", answer="x", images=["i"], image_bytes=[png((224, 56))])
    assert prompt_tokens(rotated, tokenizer, model, 4) == prompt_tokens(flat, tokenizer, model, 4)  # 1x4 vs 4x1
    (tmp_path / "r.jpg").write_bytes(rotated.image_bytes[0])  # a JSONL record's image: read from its path
    on_disk = Sample(question="q", answer="x", images=["r.jpg"], image_paths=[tmp_path / "r.jpg"])
    assert prompt_tokens(on_disk, tokenizer, model, 4) == prompt_tokens(rotated, tokenizer, model, 4)
    assert prompt_tokens(flat, tokenizer, model, 4) > prompt_tokens(flat, tokenizer, model, 1)  # 5 tiles vs 1


def test_over_long_prompts_are_skipped_counted_and_named(tmp_path, tokenizer, caplog):
    cfg = load_config("examples/tiny_cpu_rl.yaml", [])
    short = "What colour?"
    samples = [Sample(question=q, answer="a", images=["i"], image_bytes=[png((56, 56))], id=f"item{k}",
                      source=f"f.jsonl:{k + 1}")
               for k, q in enumerate([short, "word " * 300, short, short + " again", "word " * 300])]
    samples.append(Sample(question=short, answer="a", images=["i"], image_bytes=[b"not an image"], source="f:7"))
    with caplog.at_level(logging.WARNING, logger="megatron_r1v3.rl.prompts"):
        px = PixelSource(cfg, samples, tokenizer)
    assert prompt_token_budget(cfg) == 256
    assert px.positions == [0, 2, 3] and [s.position for s in px.skipped] == [1, 4, 5]
    assert [s.id for s in px.skipped] == ["item1", "item4", "f:7"] and px.skipped[0].tokens > 256
    assert "tokens > rl.max_prompt_tokens=256" in px.skipped[0].reason and "unreadable" in px.skipped[2].reason
    assert "skipping prompt item1 (f.jsonl:2)" in caplog.text and "skipped 3 of 6 prompts" in caplog.text
    assert px.prompt(1).id == "item2"  # the sampler and evaluation index only the kept prompts
    cfg.rl.eval_prompts = 3  # `--limit 3`: records 0..2 are in scope, record 1 of them skipped
    assert [in_scope(cfg, p) for p in px.positions] == [True, True, False]
    assert sum(in_scope(cfg, s.position) for s in px.skipped) == 1
    cfg.rl.eval_prompts = 0
    assert all(in_scope(cfg, p) for p in px.positions + [s.position for s in px.skipped])
    with pytest.raises(RecordError, match="f.jsonl:2: .*none of the 2 prompts is left"):
        PixelSource(cfg, [samples[1], samples[4]], tokenizer)


def test_prompt_budget_default_fits_a_full_tile_prompt_and_is_validated():
    big = load_config(None, ["model.preset=r1v3-38b"])
    assert full_image_tokens(big) == 13 * 256 + 2 and prompt_token_budget(big) == 3330 + 1024
    assert field_errors(big) == []
    errors = field_errors(load_config(None, ["model.preset=r1v3-38b", "rl.max_prompt_tokens=1024"]))
    assert len(errors) == 1 and "rl.max_prompt_tokens=1024" in errors[0] and "data.max_tiles=12" in errors[0]
    assert field_errors(load_config(None, ["model.preset=r1v3-38b", "data.max_tiles=2", "rl.max_prompt_tokens=1024"
                                           ])) == []  # 3 x 256 + 2 + 64 fits
    assert field_errors(load_config("examples/r1v3_38b_grpo.yaml", [])) == []


def eval_cfg(*argv: str):
    args = build_parser().parse_args(list(argv))
    return _eval_config(args)


def test_eval_flags_limit_and_budget():
    recipe, base = "examples/tiny_cpu_rl.yaml", ["--checkpoint", "c", "--out", "o"]
    cfg = eval_cfg("eval", recipe, *base)
    assert cfg.rl.eval_prompts == 0 and cfg.rl.length_schedule == [[20, 96]]  # every item, recipe budget
    assert eval_cfg("eval", recipe, *base, "--limit", "5").rl.eval_prompts == 5
    assert eval_cfg("eval", recipe, "rl.eval_prompts=16", *base).rl.eval_prompts == 16
    assert eval_cfg("eval", recipe, "rl.eval_prompts=16", *base, "--limit", "3").rl.eval_prompts == 3
    assert longest_response(cfg) == 96
    small = eval_cfg("eval", recipe, *base, "--max-new-tokens", "32")
    assert longest_response(small) == 32 and small.rl.length_schedule == []
    assert longest_response(eval_cfg("eval", recipe, *base, "--max-tokens", "16")) == 16  # the old spelling
    with pytest.raises(ConfigError, match="--limit=-1"):
        eval_cfg("eval", recipe, *base, "--limit", "-1")
    with pytest.raises(ConfigError, match="--max-new-tokens=0"):
        eval_cfg("eval", recipe, *base, "--max-new-tokens", "0")
    select = eval_cfg("select-checkpoint", "examples/tiny_cpu_rl.yaml", "--checkpoints", "c", "--out", "o")
    assert select.rl.eval_prompts == 64  # selection keeps the recipe's held-out subset
