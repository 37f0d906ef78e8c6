"""Sample records: JSONL (image paths relative to a root dir) and Parquet (images embedded as list<binary>,
or a list of Hugging Face {"bytes", "path"} image structs).

A record has `images` (list), `question` (str), `answer` (str; a JSON number is accepted and kept as its text),
optional `response` (SFT trace), optional `id` and optional `meta` (a JSON object, e.g. generator facts).
Every sample carries its source location, `file:line` (JSONL, 1-based) or `file:row` (Parquet, 0-based), and
every schema problem names it: strict readers raise `RecordError`, lenient ones log, skip and count.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PARQUET_SUFFIXES = (".parquet", ".pq")


class RecordError(ValueError):
    """A malformed record; `location` is file:line (JSONL) or file:row (Parquet)."""

    def __init__(self, location: str, reason: str) -> None:
        self.location, self.reason = location, reason
        super().__init__(f"{location}: {reason}")

    def __reduce__(self):  # keep the fields when pickled across DataLoader workers
        return (type(self), (self.location, self.reason))


class SchemaError(ValueError):
    """What is wrong with one record, with a short `kind` for counters (location added by the reader)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass
class Sample:
    """One question about zero or more images, with its reference answer and optional SFT response."""

    question: str
    answer: str
    images: list[str] = field(default_factory=list)  # as written: paths relative to root (JSONL) or names
    response: str | None = None
    id: str | None = None
    meta: dict[str, Any] | None = None
    image_bytes: list[bytes] | None = None  # embedded images (Parquet); None: read from image_paths
    image_paths: list[Path] = field(default_factory=list)  # resolved paths (JSONL)
    source: str = ""  # file:line or file:row

    def load_images(self) -> list[bytes]:
        """Encoded bytes of every image, in order (embedded, or read from disk)."""
        if self.image_bytes is not None:
            return list(self.image_bytes)
        return [p.read_bytes() for p in self.image_paths]

    def image_sources(self) -> list[str]:
        """Names for decode errors: the image path, or `file:row[image k]` for embedded images."""
        if self.image_paths:
            return [str(p) for p in self.image_paths]
        return [f"{self.source}[image {k}]" for k in range(len(self.image_bytes or []))]

    def to_record(self) -> dict[str, Any]:
        """The JSONL form (image paths, no bytes); optional fields only when set."""
        record: dict[str, Any] = {"images": list(self.images), "question": self.question, "answer": self.answer}
        for key in ("response", "id", "meta"):
            if getattr(self, key) is not None:
                record[key] = getattr(self, key)
        return record


@dataclass
class RecordStats:
    """Counters of one reader: samples yielded, records skipped, and skips per kind
    (bad_json, missing_field, wrong_type, missing_image)."""

    read: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)


def _text(record: dict, key: str, required: bool, numbers_ok: bool = False) -> str | None:
    value = record.get(key)
    if value is None:
        if required:
            raise SchemaError("missing_field", f"missing field {key!r}")
        return None
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise SchemaError("wrong_type", f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _common_fields(record: Any) -> dict[str, Any]:
    """Validate the non-image fields shared by both formats; raises SchemaError naming the problem."""
    if not isinstance(record, dict):
        raise SchemaError("wrong_type", f"record must be an object, got {type(record).__name__}")
    meta = record.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise SchemaError("wrong_type", f"field 'meta' must be an object, got {type(meta).__name__}")
    return dict(
        question=_text(record, "question", True),
        answer=_text(record, "answer", True, numbers_ok=True),
        response=_text(record, "response", False),
        id=_text(record, "id", False, numbers_ok=True),
        meta=meta,
    )


def parse_jsonl_record(line: str, root: Path, check_images: bool = True) -> Sample:
    """Parse and validate one JSONL line; raises SchemaError saying what is wrong (no location)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SchemaError("bad_json", f"bad JSON: {exc}") from exc
    fields = _common_fields(record)
    images = record.get("images")
    if images is None:
        raise SchemaError("missing_field", "missing field 'images'")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise SchemaError("wrong_type", "field 'images' must be a list of path strings")
    paths = [root / p for p in images]
    if check_images:
        for rel, path in zip(images, paths):
            if not path.is_file():
                raise SchemaError("missing_image", f"image {rel!r} not found under {root}")
    return Sample(images=list(images), image_paths=paths, **fields)


def parse_parquet_row(row: dict[str, Any]) -> Sample:
    """Validate one Parquet row (as a dict); `meta` is stored as a JSON string column."""
    if isinstance(row.get("meta"), str):
        try:
            row = {**row, "meta": json.loads(row["meta"])}
        except json.JSONDecodeError as exc:
            raise SchemaError("bad_json", f"field 'meta' is not valid JSON: {exc}") from exc
    fields = _common_fields(row)
    images = row.get("images")
    if images is None:
        raise SchemaError("missing_field", "missing field 'images'")
    if isinstance(images, list):  # also accept Hugging Face's Image feature layout: {"bytes": ..., "path": ...}
        images = [b["bytes"] if isinstance(b, dict) and "bytes" in b else b for b in images]
    if not isinstance(images, list) or not all(isinstance(b, bytes) for b in images):
        raise SchemaError("wrong_type", "field 'images' must be a list of binary image files")
    names = row.get("image_names") or [f"image_{k}" for k in range(len(images))]
    return Sample(images=list(names), image_bytes=list(images), **fields)


class RecordReader:
    """Iterate samples of JSONL / Parquet files in order, validating each record.

    strict=True raises RecordError at the first bad record; strict=False logs a warning with its location,
    skips it and counts it in `stats`. JSONL image paths resolve against `root` (default: the file's folder).
    """

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        root: str | os.PathLike | None = None,
        strict: bool = True,
        check_images: bool = True,
    ) -> None:
        single = isinstance(paths, (str, os.PathLike))
        self.paths = [Path(paths)] if single else [Path(p) for p in paths]
        self.root = Path(root) if root is not None else None
        self.strict, self.check_images = strict, check_images
        self.stats = RecordStats()

    def __iter__(self) -> Iterator[Sample]:
        for path in self.paths:
            rows = _parquet_rows(path) if path.suffix in PARQUET_SUFFIXES else self._jsonl_rows(path)
            for location, parse in rows:
                try:
                    sample = parse()
                except SchemaError as exc:
                    self._bad(location, exc)
                    continue
                sample.source = location
                self.stats.read += 1
                yield sample

    def _jsonl_rows(self, path: Path) -> Iterator[tuple[str, Any]]:
        root = self.root if self.root is not None else path.parent
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if raw.strip():
                    yield f"{path}:{number}", lambda raw=raw: self._parse_line(raw, root)

    def _parse_line(self, raw: bytes, root: Path) -> Sample:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError("bad_json", f"not UTF-8: {exc}") from exc
        return parse_jsonl_record(line, root, self.check_images)

    def _bad(self, location: str, exc: SchemaError) -> None:
        if self.strict:
            raise RecordError(location, str(exc)) from exc
        self.stats.skipped += 1
        self.stats.reasons[exc.kind] += 1
        log.warning("skipping record %s: %s", location, exc)


def _parquet_rows(path: Path, batch_rows: int = 256) -> Iterator[tuple[str, Any]]:
    """Stream (location, parse) pairs from a Parquet file without loading it whole."""
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        for record in batch.to_pylist():
            yield f"{path}:{row}", lambda record=record: parse_parquet_row(record)
            row += 1


def read_records(path: str | os.PathLike, root: str | os.PathLike | None = None, strict: bool = True) -> list[Sample]:
    """All samples of one file (convenience for small files and tests)."""
    return list(RecordReader(path, root=root, strict=strict))


def write_jsonl(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    """Write samples as JSONL (one object per line, UTF-8, keys in a fixed order); returns the count."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as handle:
        for sample in samples:
            handle.write(json.dumps(sample.to_record(), ensure_ascii=False) + "\n")
            count += 1
    return count


_PARQUET_SCHEMA_FIELDS = (
    ("id", "string"),
    ("images", "list<binary>"),
    ("image_names", "list<string>"),
    ("question", "string"),
    ("answer", "string"),
    ("response", "string"),
    ("meta", "string"),
)


def _parquet_schema():
    import pyarrow as pa

    types = {"string": pa.string(), "list<binary>": pa.list_(pa.binary()), "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, kind in _PARQUET_SCHEMA_FIELDS])


def _parquet_row(sample: Sample) -> dict[str, Any]:
    return {
        "id": sample.id,
        "images": sample.load_images(),
        "image_names": list(sample.images),
        "question": sample.question,
        "answer": sample.answer,
        "response": sample.response,
        "meta": None if sample.meta is None else json.dumps(sample.meta, sort_keys=True),
    }


def write_parquet(path: str | os.PathLike, samples: Iterable[Sample], rows_per_group: int = 512) -> int:
    """Write samples as Parquet with the image bytes embedded (list<binary>), streaming row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema, count, rows = _parquet_schema(), 0, []
    with pq.ParquetWriter(path, schema) as writer:
        for sample in samples:
            rows.append(_parquet_row(sample))
            count += 1
            if len(rows) == rows_per_group:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                rows = []
        if rows or count == 0:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return count
