"""SFT microbatches from records: decode + tile images, encode the R1V3 template, collate to fixed shapes.

`SFTBatchIterator` yields the dict `training.step` consumes, every batch with the same shapes:
- `input_ids [b, s]` (right-padded with the pad id), `labels [b, s]`, `loss_mask [b, s]` float (label convention in
  `template.py`: labels[t] = input_ids[t+1], mask 1 where that next token is an assistant token);
- `pixel_values [total_tiles, 3, S, S]`: tiles in the order their `<IMG_CONTEXT>` tokens appear in the row-major
  flattened `input_ids` (sample 0's images first, each image's tiles thumbnail last), as `vlm.splice_image_embeddings`
  consumes them;
- `position_ids [b, s]` (restarting at 0 per segment), `cu_seqlens` (int32, segment starts in the flattened b*s
  tokens, padding tails as their own segments, ending with b*s), `max_seqlen`, `packed` (the collate mode); and
  counters `num_samples`, `num_tiles`, `num_image_tokens`, `num_loss_tokens`, `sample_sources` (file:line of each
  sample).

Two collate modes. Padding (default): one sample per row, `seq_length` fixed (pipeline parallelism needs fixed
shapes). Packing (`pack=True`): samples are concatenated in stream order into rows of up to `seq_length` tokens
(next-fit). Packing changes the maths unless the attention knows the boundaries: with the plain causal mask a packed
sample would attend to the samples before it in its row. `training.step` therefore runs a `packed` batch as one THD
row of b*s tokens with `PackedSeqParams(qkv_format="thd", cu_seqlens_q/kv=cu_seqlens, max_seqlen_q/kv=max_seqlen)`
(`models/packing.py`: per-sample attention and RoPE positions, on TE and on the local spec). Labels never cross a
sample boundary: each sample's last position is masked.

Order and sharding: the stream is epoch after epoch of the records in a permutation drawn from (seed, epoch); rank
`dp_rank` of `dp_size` takes stream positions dp_rank, dp_rank + dp_size, ... so ranks are disjoint and together
cover every record once per epoch. Bad samples (missing or corrupt image, over-long, no response, image tokens in
the text, anything else that fails) are skipped, counted by reason and logged with their file:line; `strict=True`
raises BadSampleError instead. Malformed records are dropped (or raised) by `records.RecordReader` at load.
`state_dict()` holds the number of stream positions consumed; a resumed iterator yields exactly the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from megatron_r1v3.data.decode_pillow import ImageDecodeError
from megatron_r1v3.data.records import RecordReader, RecordStats, Sample
from megatron_r1v3.data.template import EncodedSample, SampleTooLong, encode_sft_sample
from megatron_r1v3.data.tiling import TilingConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
STATE_VERSION = 1


class ImageDecoder(Protocol):
    """What `dali.make_image_decoder` builds: bytes in, per-item tiles or ImageDecodeError out."""

    def decode_and_tile(
        self, items: Sequence[bytes], sources: Sequence[str] | None = None
    ) -> list[torch.Tensor | ImageDecodeError]: ...


class BadSampleError(ValueError):
    """A sample that cannot be trained on (strict mode); `location` is file:line, `kind` the counter name."""

    def __init__(self, location: str, kind: str, reason: str) -> None:
        self.location, self.kind, self.reason = location, kind, reason
        super().__init__(f"{location}: {kind}: {reason}")

    def __reduce__(self):  # keep the fields when pickled across DataLoader workers
        return (type(self), (self.location, self.kind, self.reason))


@dataclass
class SFTDataStats:
    """Counters of one rank: stream positions consumed, samples batched, skips by reason, load-time record drops."""

    consumed: int = 0
    samples: int = 0
    batches: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_records: Counter = field(default_factory=Counter)


@dataclass
class _Ready:
    position: int
    source: str
    encoded: EncodedSample
    tiles: torch.Tensor  # [n_tiles, 3, S, S]
    n_images: int = 0


@dataclass
class _Skip:
    position: int
    source: str
    kind: str
    reason: str


class SFTBatchIterator:
    """Endless (or `num_epochs`-long) iterator of fixed-shape SFT microbatches for one data-parallel rank."""

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer: PreTrainedTokenizerBase,
        tiling: TilingConfig,
        tokens_per_tile: int,
        seq_length: int,
        micro_batch_size: int = 1,
        *,
        decoder: str | ImageDecoder = "dali",
        pack: bool = False,
        seed: int = 0,
        shuffle: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_epochs: int | None = None,
        strict: bool = False,
        decode_threads: int = 1,
        decode_chunk: int | None = None,
        record_stats: RecordStats | None = None,
    ) -> None:
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if seq_length < 2 or micro_batch_size < 1:
            raise ValueError(f"need seq_length >= 2 and micro_batch_size >= 1, got {seq_length}, {micro_batch_size}")
        if not samples:
            raise ValueError("no samples to train on")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token")
        self.samples, self.tokenizer, self.tiling = list(samples), tokenizer, tiling
        self.tokens_per_tile, self.seq_length, self.micro_batch_size = tokens_per_tile, seq_length, micro_batch_size
        self.pack, self.seed, self.shuffle = pack, seed, shuffle
        self.dp_rank, self.dp_size, self.num_epochs, self.strict = dp_rank, dp_size, num_epochs, strict
        self.decode_chunk = decode_chunk or micro_batch_size * (4 if pack else 1)
        if isinstance(decoder, str):
            from megatron_r1v3.data.dali import make_image_decoder

            decoder = make_image_decoder(decoder, tiling, batch_size=self.decode_chunk, num_threads=decode_threads)
        self.decoder = decoder
        self.stats = SFTDataStats()
        if record_stats is not None:
            self.stats.skipped_records.update(record_stats.reasons)
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._restart()

    @classmethod
    def from_files(
        cls,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        tokenizer: PreTrainedTokenizerBase,
        *,
        root: str | os.PathLike | None = None,
        strict: bool = False,
        **kwargs: Any,
    ) -> SFTBatchIterator:
        """Read JSONL/Parquet records (images are checked when used, not at load) and build the iterator."""
        reader = RecordReader(paths, root=root, strict=strict, check_images=False)
        samples = list(reader)
        return cls(samples, tokenizer, strict=strict, record_stats=reader.stats, **kwargs)

    # ---- the per-rank stream of samples --------------------------------------------------------------------
    def samples_per_epoch(self) -> int:
        """Stream positions per epoch on this rank (ceil or floor of records / dp_size)."""
        n = len(self.samples)
        return n // self.dp_size + int(self.dp_rank < n % self.dp_size)

    def _record_index(self, position: int) -> int | None:
        """Record index at this rank's stream position, or None past the last epoch."""
        n = len(self.samples)
        global_pos = position * self.dp_size + self.dp_rank
        epoch = global_pos // n
        if self.num_epochs is not None and epoch >= self.num_epochs:
            return None
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, order)
        return int(self._order_cache[1][global_pos % n])

    def _load(self, position: int, sample: Sample) -> list[bytes] | _Skip:
        if sample.response is None:
            return _Skip(position, sample.source, "no_response", "record has no 'response' to train on")
        try:
            return sample.load_images()
        except OSError as exc:
            return _Skip(position, sample.source, "missing_image", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # never let one sample end the run
            return _Skip(position, sample.source, "error", f"{type(exc).__name__}: {exc}")

    def _decode(self, items: list[bytes], sources: list[str]) -> list[torch.Tensor | ImageDecodeError]:
        if not items:
            return []
        try:
            return self.decoder.decode_and_tile(items, sources)
        except Exception:  # a decoder failing a whole call: isolate the bad item(s) one by one
            out: list = []
            for index, (item, source) in enumerate(zip(items, sources)):
                try:
                    out += self.decoder.decode_and_tile([item], [source])
                except Exception as exc:
                    out.append(ImageDecodeError(index, source, f"{type(exc).__name__}: {exc}"))
            return out

    def _prepare(self, position: int, sample: Sample, tiles: list) -> _Ready | _Skip:
        for item in tiles:
            if isinstance(item, ImageDecodeError):
                return _Skip(position, sample.source, "corrupt_image", str(item))
        try:
            encoded = encode_sft_sample(
                self.tokenizer,
                sample.question,
                sample.response or "",
                [int(t.shape[0]) for t in tiles],
                self.tokens_per_tile,
                self.seq_length,
            )
        except SampleTooLong as exc:
            return _Skip(position, sample.source, "too_long", str(exc))
        except ValueError as exc:
            return _Skip(position, sample.source, "bad_text", str(exc))
        empty = torch.empty(0, 3, self.tiling.tile_size, self.tiling.tile_size)
        return _Ready(position, sample.source, encoded, torch.cat(tiles) if tiles else empty, len(tiles))

    def _chunk(self, positions: list[int]) -> list[_Ready | _Skip]:
        """Prepare consecutive stream positions, decoding all their images in one decoder call."""
        loaded = [(p, self.samples[self._record_index(p)]) for p in positions]
        raw = [(p, s, self._load(p, s)) for p, s in loaded]
        items, sources = [], []
        for _, sample, data in raw:
            if not isinstance(data, _Skip):
                items += data
                sources += sample.image_sources() or [sample.source] * len(data)
        decoded = iter(self._decode(items, sources))
        out: list[_Ready | _Skip] = []
        for position, sample, data in raw:
            if isinstance(data, _Skip):
                out.append(data)
                continue
            tiles = [next(decoded) for _ in data]
            try:
                out.append(self._prepare(position, sample, tiles))
            except Exception as exc:  # never let one sample end the run (strict mode still raises, at consume)
                out.append(_Skip(position, sample.source, "error", f"{type(exc).__name__}: {exc}"))
        return out

    def _stream(self, start: int) -> Iterator[_Ready | _Skip]:
        position = start
        while True:
            positions = []
            while len(positions) < self.decode_chunk and self._record_index(position) is not None:
                positions.append(position)
                position += 1
            if not positions:
                return
            yield from self._chunk(positions)

    def _restart(self) -> None:
        self._items = self._stream(self.stats.consumed)
        self._pending: _Ready | _Skip | None = None

    def _peek(self) -> _Ready | _Skip | None:
        if self._pending is None:
            self._pending = next(self._items, None)
        return self._pending

    def _consume(self) -> None:
        item = self._pending
        assert item is not None
        if isinstance(item, _Skip):
            if self.strict:
                raise BadSampleError(item.source, item.kind, item.reason)
            self.stats.skipped[item.kind] += 1
            log.warning("skipping sample %s (%s): %s", item.source, item.kind, item.reason)
        self.stats.consumed = item.position + 1
        self._pending = None

    # ---- batches ---------------------------------------------------------------------------------------------
    def __iter__(self) -> SFTBatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        rows: list[list[_Ready]] = []
        used = 0
        while (item := self._peek()) is not None:
            if isinstance(item, _Skip):
                self._consume()
                continue
            n = len(item.encoded)
            if rows and self.pack and used + n <= self.seq_length:
                rows[-1].append(item)
                used += n
            elif len(rows) < self.micro_batch_size:
                rows.append([item])
                used = n
            else:
                break
            self._consume()
            if not self.pack and len(rows) == self.micro_batch_size:
                break
        if not rows:
            raise StopIteration
        self.stats.samples += sum(len(row) for row in rows)
        self.stats.batches += 1
        return collate_rows(rows, self.micro_batch_size, self.seq_length, self.tokenizer.pad_token_id, self.tiling,
                            pack=self.pack)

    # ---- resume ----------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        return {
            "num_records": len(self.samples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "dp_rank": self.dp_rank,
            "dp_size": self.dp_size,
            "pack": self.pack,
            "seq_length": self.seq_length,
            "micro_batch_size": self.micro_batch_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Position (stream positions consumed) and counters; plain types, safe to store in a checkpoint."""
        return {
            "version": STATE_VERSION,
            **self._fingerprint(),
            "consumed": self.stats.consumed,
            "samples": self.stats.samples,
            "batches": self.stats.batches,
            "skipped": dict(self.stats.skipped),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the data layout (records, seed, ranks, shapes) must be the same."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data state version {state.get('version')!r}, expected {STATE_VERSION}")
        wrong = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in self._fingerprint().items() if state.get(k) != v]
        if wrong:
            raise ValueError("cannot resume the SFT data stream exactly; changed: " + "; ".join(wrong))
        self.stats.consumed, self.stats.samples = int(state["consumed"]), int(state["samples"])
        self.stats.batches, self.stats.skipped = int(state["batches"]), Counter(state["skipped"])
        self._restart()

    def close(self) -> None:
        """Release the decoder's threads/pipelines."""
        close = getattr(self.decoder, "close", None)
        if close is not None:
            close()


def collate_rows(
    rows: list[list[_Ready]], micro_batch_size: int, seq_length: int, pad_id: int, tiling: TilingConfig,
    pack: bool = False,
) -> dict[str, Any]:
    """Lay rows of samples into fixed [micro_batch_size, seq_length] tensors (missing rows stay empty padding);
    `pack` marks the batch for the per-sample (THD) attention every packed microbatch of a step needs."""
    b, s = micro_batch_size, seq_length
    input_ids = torch.full((b, s), pad_id, dtype=torch.int64)
    labels = torch.full((b, s), pad_id, dtype=torch.int64)
    loss_mask = torch.zeros((b, s), dtype=torch.float32)
    position_ids = torch.arange(s, dtype=torch.int64).repeat(b, 1)
    starts: list[int] = []
    tiles: list[torch.Tensor] = []
    sources: list[str] = []
    n_image, n_images = 0, 0
    for r in range(b):
        offset = 0
        for item in rows[r] if r < len(rows) else []:
            enc, n = item.encoded, len(item.encoded)
            input_ids[r, offset : offset + n] = enc.input_ids
            labels[r, offset : offset + n] = enc.labels
            loss_mask[r, offset : offset + n] = enc.loss_mask
            position_ids[r, offset : offset + n] = torch.arange(n)
            starts.append(r * s + offset)
            offset += n
            if item.tiles.shape[0]:  # text-only samples add nothing (and no CPU tensor beside GPU tiles)
                tiles.append(item.tiles)
            sources.append(item.source)
            n_image += enc.n_image_tokens
            n_images += item.n_images
        if offset < s:
            starts.append(r * s + offset)  # the padding tail is its own segment, positions restarting like one
            position_ids[r, offset:] = torch.arange(s - offset)
    bounds = starts + [b * s]
    size = tiling.tile_size
    pixel_values = torch.cat(tiles) if tiles else torch.empty(0, 3, size, size)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "pixel_values": pixel_values,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])),
        "packed": pack,
        "num_samples": len(sources),
        "num_images": n_images,
        "num_tiles": int(pixel_values.shape[0]),
        "num_image_tokens": n_image,
        "num_loss_tokens": int(loss_mask.sum().item()),
        "sample_sources": sources,
    }
