"""Benchmark files in the common Hugging Face `datasets` export layout (MMMU / MathVista style) as eval samples.

One row per question, JSONL or Parquet:
- `question` (str) and `answer` (str or number: an option letter, an option's text, or a free-form answer);
- `options` or `choices`: a list, or that list as a JSON / Python-literal string (MMMU writes `"['1', '2']"`);
  empty or missing = a free-form question. At most 8 options (A-H, the letters the reward knows);
- images: `image` / `decoded_image` / `images` / `image_1`..`image_N`, each a path string (relative to the data
  root, default the file's folder) or a `datasets` Image struct `{"bytes": ..., "path": ...}` (bytes embedded, as
  `datasets` writes Parquet; base64 text in JSONL); null entries are ignored;
- optional `id` (or `pid` / `question_id` / `index`), `question_type`, `answer_type`.

The question is rendered for the R1V3 template (`data.template.render_prompt` adds the image lines and the think
prefill) with the options listed as `A. ...` lines and one instruction line, the layout the toy task's
multiple-choice questions use; the options go to the reward in `meta["options"]`, so a chosen letter or an option's
text is scored against the answer. Every bad row is an error naming `file:line` (JSONL, 1-based) or `file:row`
(Parquet, 0-based): a benchmark's score must cover all of its rows.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_r1v3.data.answers import answers_match
from megatron_r1v3.data.records import PARQUET_SUFFIXES, RecordError, Sample

LETTERS = "ABCDEFGH"
MC_INSTRUCTION = "Answer with the option's letter."
OPTION_COLUMNS = ("options", "choices")
ID_COLUMNS = ("id", "pid", "question_id", "index")
IMAGE_COLUMNS = ("decoded_image", "image", "images")  # in order of preference; then image_1, image_2, ...
_NUMBERED_IMAGE = re.compile(r"^image_(\d+)$")
_LETTER = re.compile(r"^\(?([A-H])\)?[.:]?$")  # upper case only, as the reward reads a truth letter
# columns that mark the benchmark layout (our own record layout has `images` + `meta` and none of these)
_BENCHMARK_MARKS = frozenset(OPTION_COLUMNS + ("image", "decoded_image", "question_type", "answer_type"))


class BenchmarkRowError(ValueError):
    """What is wrong with one row (the reader adds its location)."""


def _columns(path: Path) -> list[str]:
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                try:
                    record = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return []  # not ours to judge: the record reader reports the line
                return list(record) if isinstance(record, dict) else []
    return []


def is_benchmark_file(path: str | os.PathLike) -> bool:
    """True when the file's columns (Parquet schema, or the first JSONL object's keys) are the benchmark layout."""
    names = set(_columns(Path(path)))
    return bool(names & _BENCHMARK_MARKS) or any(_NUMBERED_IMAGE.match(n) for n in names)


def parse_options(value: Any) -> list[str] | None:
    """A list of option texts from a list or its JSON / Python-literal string; None for no options."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as exc:
                raise BenchmarkRowError(f"options {value[:80]!r} is neither a list nor a JSON/Python list string"
                                        ) from exc
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise BenchmarkRowError(f"options must be a list, got {type(value).__name__}")
    if not value:
        return None
    bad = [i for i, v in enumerate(value) if not isinstance(v, (str, int, float)) or isinstance(v, bool)]
    if bad:
        raise BenchmarkRowError(f"option {LETTERS[bad[0]] if bad[0] < len(LETTERS) else bad[0]} is "
                                f"{type(value[bad[0]]).__name__}, not text")
    if len(value) > len(LETTERS):
        raise BenchmarkRowError(f"{len(value)} options; at most {len(LETTERS)} (A-H) are supported")
    return [str(v).strip() for v in value]


def render_question(question: str, options: list[str] | None) -> str:
    """The question text for the template: with options, one `A. ...` line each and the instruction line."""
    if not options:
        return question
    lines = [question] + [f"{letter}. {opt}" for letter, opt in zip(LETTERS, options)]
    return "\n".join(lines + [MC_INSTRUCTION])


def _answer(row: dict, options: list[str] | None) -> str:
    value = row.get("answer")
    if value is None:
        raise BenchmarkRowError("missing field 'answer'")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise BenchmarkRowError(f"field 'answer' must be text or a number, got {type(value).__name__}")
    answer = str(value).strip()
    if not answer:
        raise BenchmarkRowError("field 'answer' is empty")
    if options:
        m = _LETTER.match(answer)
        if m and LETTERS.index(m.group(1)) < len(options):
            return m.group(1)
        if not any(answers_match(answer, opt) for opt in options):
            last = LETTERS[len(options) - 1]
            raise BenchmarkRowError(f"answer {answer!r} is neither an option letter A-{last} nor one of the options "
                                    f"{options}")
    return answer


def _image(value: Any, root: Path, name: str) -> bytes | Path:
    """One image cell: embedded bytes, or the resolved path of an existing file."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if isinstance(data, str):  # JSONL exports carry the bytes as base64 text
            try:
                data = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BenchmarkRowError(f"{name}: 'bytes' is text but not base64") from exc
        if data:
            if not isinstance(data, (bytes, bytearray)):
                raise BenchmarkRowError(f"{name}: 'bytes' must be binary, got {type(data).__name__}")
            return bytes(data)
        value = path
        if value is None:
            raise BenchmarkRowError(f"{name}: image struct has neither bytes nor a path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise BenchmarkRowError(f"{name} must be a path string or an image struct, got {type(value).__name__}")
    path = root / value
    if not path.is_file():
        raise BenchmarkRowError(f"{name}: image {value!r} not found under {root}")
    return path


def _images(row: dict, root: Path) -> list[bytes | Path]:
    for column in IMAGE_COLUMNS:
        value = row.get(column)
        if value is None:
            continue
        cells = value if isinstance(value, list) else [value]
        return [_image(v, root, f"{column}[{k}]" if isinstance(value, list) else column)
                for k, v in enumerate(cells) if v is not None]
    numbered = sorted((int(m.group(1)), key) for key in row if (m := _NUMBERED_IMAGE.match(key)))
    return [_image(row[key], root, key) for _, key in numbered if row[key] is not None]


def _row_id(row: dict) -> str | None:
    for column in ID_COLUMNS:
        value = row.get(column)
        if value is not None and not isinstance(value, bool):
            return str(value)
    return None


def parse_benchmark_row(row: Any, root: Path) -> Sample:
    """One benchmark row -> a Sample (question rendered with its options); raises BenchmarkRowError."""
    if not isinstance(row, dict):
        raise BenchmarkRowError(f"row must be an object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BenchmarkRowError("field 'question' must be a non-empty string"
                                + ("" if "question" in row else " (missing)"))
    raw_options = next((row[c] for c in OPTION_COLUMNS if row.get(c) is not None), None)
    options = parse_options(raw_options)
    qtype = row.get("question_type")
    if options is None and isinstance(qtype, str) and "choice" in qtype.lower():
        raise BenchmarkRowError(f"question_type {qtype!r} but no options")
    answer = _answer(row, options)
    images = _images(row, root)
    meta = {k: row[k] for k in ("question_type", "answer_type") if isinstance(row.get(k), str)}
    if options:
        meta["options"] = options
    names = [str(p) if isinstance(p, Path) else f"image_{k}" for k, p in enumerate(images)]
    sample = Sample(question=render_question(question, options), answer=answer, images=names, id=_row_id(row),
                    meta=meta or None)
    if any(isinstance(x, bytes) for x in images):  # embedded (and any path-given ones read now)
        sample.image_bytes = [x if isinstance(x, bytes) else x.read_bytes() for x in images]
    else:
        sample.image_paths = list(images)  # type: ignore[arg-type]
    return sample


def _rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix in PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield f"{path}:{row}", record
                row += 1
        return
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RecordError(f"{path}:{number}", f"bad JSON: {exc}") from exc


def read_benchmark(path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[Sample]:
    """Every row of a benchmark file as a Sample (source `file:line` / `file:row`); RecordError on a bad row."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    samples = []
    for location, record in _rows(path):
        try:
            sample = parse_benchmark_row(record, base)
        except BenchmarkRowError as exc:
            raise RecordError(location, str(exc)) from exc
        sample.source = location
        samples.append(sample)
    if not samples:
        raise RecordError(str(path), "benchmark file has no rows")
    return samples
