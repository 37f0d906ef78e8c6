"""Sample records: JSONL and Parquet round trips, locations in errors, strict vs lenient readers."""

import json
import logging

import pytest

from megatron_r1v3.data.records import RecordError, RecordReader, Sample, read_records, write_jsonl, write_parquet


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "img" / name).write_bytes(f"bytes of {name}".encode())
    return tmp_path


def samples(root):
    return [
        Sample(question="q1", answer="A", images=["img/a.png"], image_paths=[root / "img/a.png"], id="s1"),
        Sample(
            question="q2\nwith lines",
            answer="42",
            images=["img/a.png", "img/b.jpg"],
            image_paths=[root / "img/a.png", root / "img/b.jpg"],
            response="<think>\nx\n</think>\n\nThe answer is \\boxed{42}.",
            meta={"task": "count", "count": 42},
        ),
        Sample(question="text only", answer="yes"),
    ]


def test_jsonl_round_trip_with_locations(root):
    path = root / "data.jsonl"
    assert write_jsonl(path, samples(root)) == 3
    got = read_records(path)
    assert [s.question for s in got] == ["q1", "q2\nwith lines", "text only"]
    assert [s.source for s in got] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert got[1].images == ["img/a.png", "img/b.jpg"]
    assert got[1].load_images() == [b"bytes of a.png", b"bytes of b.jpg"]
    assert got[1].response.endswith("\\boxed{42}.") and got[1].meta == {"task": "count", "count": 42}
    assert got[0].id == "s1" and got[2].id is None and got[2].response is None and got[2].images == []
    assert got[1].image_sources() == [str(root / "img/a.png"), str(root / "img/b.jpg")]


def test_parquet_round_trip_embeds_images(root):
    path = root / "data.parquet"
    assert write_parquet(path, samples(root), rows_per_group=2) == 3
    got = read_records(path)
    assert [s.source for s in got] == [f"{path}:0", f"{path}:1", f"{path}:2"]
    assert got[1].image_bytes == [b"bytes of a.png", b"bytes of b.jpg"]
    assert got[1].load_images() == [b"bytes of a.png", b"bytes of b.jpg"]
    assert got[1].images == ["img/a.png", "img/b.jpg"]
    assert got[1].meta == {"task": "count", "count": 42}
    assert got[1].image_sources() == [f"{path}:1[image 0]", f"{path}:1[image 1]"]
    assert got[2].image_bytes == [] and got[2].response is None
    jsonl = read_records(_write_lines(root, [json.dumps(s.to_record()) for s in samples(root)]))
    for a, b in zip(got, jsonl):
        assert (a.question, a.answer, a.response, a.id, a.meta) == (b.question, b.answer, b.response, b.id, b.meta)


def _write_lines(root, lines, name="bad.jsonl"):
    path = root / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"images": ["img/a.png"], "question": "q", "answer": "a"})
BAD_LINES = {
    "bad JSON": '{"images": ["img/a.png"], "question": "q", ',
    "missing field 'answer'": json.dumps({"images": [], "question": "q"}),
    "missing field 'images'": json.dumps({"question": "q", "answer": "a"}),
    "field 'question' must be a string": json.dumps({"images": [], "question": 5, "answer": "a"}),
    "field 'images' must be a list": json.dumps({"images": "img/a.png", "question": "q", "answer": "a"}),
    "not found": json.dumps({"images": ["img/missing.png"], "question": "q", "answer": "a"}),
    "record must be an object": json.dumps(["images"]),
}


@pytest.mark.parametrize("expected", list(BAD_LINES))
def test_strict_reader_names_file_and_line(root, expected):
    path = _write_lines(root, [GOOD, "", GOOD, BAD_LINES[expected], GOOD])
    with pytest.raises(RecordError) as info:
        read_records(path, strict=True)
    assert info.value.location == f"{path}:4"
    assert str(info.value).startswith(f"{path}:4: ") and expected in str(info.value)


def test_lenient_reader_skips_counts_and_warns(root, caplog):
    lines = [GOOD] + list(BAD_LINES.values()) + [GOOD]
    path = _write_lines(root, lines)
    reader = RecordReader(path, strict=False)
    with caplog.at_level(logging.WARNING, logger="megatron_r1v3.data.records"):
        got = list(reader)
    assert len(got) == 2 and [s.source for s in got] == [f"{path}:1", f"{path}:{len(lines)}"]
    assert reader.stats.read == 2 and reader.stats.skipped == len(BAD_LINES)
    assert reader.stats.reasons == {"bad_json": 1, "missing_field": 2, "wrong_type": 3, "missing_image": 1}
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(BAD_LINES)
    assert all(f"{path}:{n}" in w for n, w in zip(range(2, 2 + len(BAD_LINES)), warned))


def test_numbers_accepted_for_answer_and_id_blank_lines_skipped(root):
    path = _write_lines(root, ["", json.dumps({"images": [], "question": "q", "answer": 7, "id": 3}), "  "])
    (sample,) = read_records(path)
    assert sample.answer == "7" and sample.id == "3" and sample.source == f"{path}:2"
    bad = _write_lines(root, [json.dumps({"images": [], "question": "q", "answer": True})], "bool.jsonl")
    with pytest.raises(RecordError, match="must be a string"):
        read_records(bad)


def test_root_override_and_unchecked_images(root, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("records")
    path = _write_lines(elsewhere, [GOOD])
    with pytest.raises(RecordError, match="not found"):
        read_records(path)
    (sample,) = read_records(path, root=root)
    assert sample.image_paths == [root / "img/a.png"]
    (unchecked,) = list(RecordReader(path, check_images=False))
    assert unchecked.image_paths == [elsewhere / "img/a.png"]


def test_non_utf8_line_is_a_located_record_error(root):
    path = root / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"question": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(RecordError, match="not UTF-8") as info:
        read_records(path)
    assert info.value.location == f"{path}:2"


def test_parquet_accepts_hugging_face_image_structs(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "hf.parquet"
    images = [[{"bytes": b"png-bytes", "path": "a.png"}]]
    pq.write_table(pa.table({"images": images, "question": ["q"], "answer": ["a"]}), path)
    (sample,) = read_records(path)
    assert sample.load_images() == [b"png-bytes"]


def test_parquet_schema_errors_name_the_row(root):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / "bad.parquet"
    table = pa.table({"images": [[b"x"], [b"y"]], "question": ["q", None], "answer": ["a", "b"]})
    pq.write_table(table, path)
    with pytest.raises(RecordError) as info:
        read_records(path)
    assert info.value.location == f"{path}:1" and "missing field 'question'" in str(info.value)
    reader = RecordReader(path, strict=False)
    assert [s.source for s in reader] == [f"{path}:0"] and reader.stats.skipped == 1
