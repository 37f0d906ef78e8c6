"""Pillow reference decoding: encoded bytes -> RGB uint8, and the explicit `data.decoder="pillow"` fallback.

Pixels follow the RGB rule of `tiling.to_rgb`; the DALI path is tested against `decode_rgb`.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from megatron_r1v3.data.tiling import TilingConfig, tile_image_pillow, to_rgb


class ImageDecodeError(ValueError):
    """One image that could not be decoded; names its position in the batch and its source (path or file:row)."""

    def __init__(self, index: int | None, source: str | None, reason: str) -> None:
        self.index, self.source, self.reason = index, source, reason
        where = "image" if index is None else f"image #{index}"
        if source:
            where += f" ({source})"
        super().__init__(f"{where}: cannot decode: {reason}")

    def __reduce__(self):  # keep the fields when pickled across DataLoader workers
        return (type(self), (self.index, self.source, self.reason))


def open_image(data: bytes, index: int | None = None, source: str | None = None) -> Image.Image:
    """Decode bytes fully with Pillow (truncated or corrupt data raises ImageDecodeError, never half an image)."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError as exc:
        reason = f"unknown format or corrupt header (starts with {data[:8]!r})"
        raise ImageDecodeError(index, source, reason) from exc
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise ImageDecodeError(index, source, f"{type(exc).__name__}: {exc}") from exc
    return img


def open_rgb(data: bytes, index: int | None = None, source: str | None = None) -> Image.Image:
    """Decode bytes and apply the RGB rule (`tiling.to_rgb`); any failure is an ImageDecodeError."""
    img = open_image(data, index, source)
    try:
        return to_rgb(img)
    except Exception as exc:  # e.g. a mode Pillow cannot convert (LAB TIFF)
        raise ImageDecodeError(index, source, f"cannot convert {img.mode} to RGB: {exc}") from exc


def decode_rgb(data: bytes, index: int | None = None, source: str | None = None) -> np.ndarray:
    """Bytes -> RGB uint8 HWC numpy array (the reference DALI's decoder is checked against)."""
    return np.ascontiguousarray(np.asarray(open_rgb(data, index, source), dtype=np.uint8))


def source_names(count: int, sources: Sequence[str] | None) -> list[str | None]:
    """Per-item names for error messages; checks the length when given."""
    if sources is None:
        return [None] * count
    if len(sources) != count:
        raise ValueError(f"{len(sources)} sources for {count} images")
    return list(sources)


class PillowImageDecoder:
    """Decode + tile + normalise with Pillow, optionally over a thread pool (Pillow releases the GIL)."""

    def __init__(self, cfg: TilingConfig, num_threads: int = 1) -> None:
        self.cfg = cfg
        self.num_threads = max(1, num_threads)
        self._pool = ThreadPoolExecutor(self.num_threads) if self.num_threads > 1 else None

    def _one(self, args: tuple[int, bytes, str | None]) -> torch.Tensor | ImageDecodeError:
        index, data, source = args
        try:
            return tile_image_pillow(open_rgb(data, index, source), self.cfg)
        except ImageDecodeError as exc:
            return exc

    def decode_and_tile(
        self, items: Sequence[bytes], sources: Sequence[str] | None = None
    ) -> list[torch.Tensor | ImageDecodeError]:
        """Per item: float32 [n_i, 3, S, S] tiles, or the ImageDecodeError naming that item."""
        jobs = list(zip(range(len(items)), items, source_names(len(items), sources)))
        if self._pool is None:
            return [self._one(job) for job in jobs]
        return list(self._pool.map(self._one, jobs))

    def close(self) -> None:
        """Stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
