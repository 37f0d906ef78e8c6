"""InternVL dynamic tiling: the one definition shared by SFT, RL rollout prompts and eval.

The geometry (`choose_grid`, `num_tiles`) is pure Python so the DALI path and the Pillow path agree on how
many tiles an image gets; the pixel work here is the Pillow reference (`tile_image_pillow`).

Semantics follow InternVL's `dynamic_preprocess`: candidate grids (cols, rows) with
min_tiles <= cols*rows <= max_tiles, pick the one whose aspect ratio cols/rows is closest to width/height
(on an exact tie the later candidate wins when the image area exceeds half the grid's pixel area), resize the
whole image to (tile*cols, tile*rows) with bicubic, cut the tiles row-major, and append a tile x tile
thumbnail of the whole image when there is more than one tile. Tiles are normalised like torchvision's
`ToTensor` + `Normalize(ImageNet mean/std)`, float32 CHW.

Every image first goes through `to_rgb`, the one RGB rule (the DALI path gives identical pixels):
- EXIF orientation is applied (`ImageOps.exif_transpose`; DALI's `adjust_orientation` matches it for all 8
  orientations), so phone photos look as their annotators saw them. InternVL's own loader ignores EXIF;
- alpha (RGBA, LA, PA, palette or colour-key transparency) is composited onto white with Pillow's masked
  paste, exactly as vLLM's `convert_image_mode` does, so transparent diagrams stay readable;
- 16-bit grey ("I;16", "I") is scaled to 8 bits with rounding (Pillow's own conversion would clip);
- CMYK, greyscale, palette and every other mode use Pillow's ``convert("RGB")``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_WIDE_GREY_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class TilingConfig:
    """Knobs of dynamic tiling; 448 px tiles for R1V3-38B, 56 px for the tiny preset."""

    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.tile_size < 1:
            raise ValueError(f"tile_size must be >= 1, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}..{self.max_tiles}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need 3 channels each, std > 0")


@functools.lru_cache(maxsize=128)
def candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """All (cols, rows) grids allowed by the tile budget, in InternVL's candidate order.

    The order among grids with the same tile count decides exact ties, and InternVL takes it from iterating a
    set built by these loops; CPython hashes small int tuples deterministically, so building the same set the
    same way and sorting it stably by tile count reproduces that order.
    """
    grids = set(
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    )
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def choose_grid(width: int, height: int, tile: int = 448, min_tiles: int = 1, max_tiles: int = 12) -> tuple[int, int]:
    """Return the (cols, rows) grid InternVL uses for a width x height image."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def grid_for(width: int, height: int, cfg: TilingConfig) -> tuple[int, int]:
    """`choose_grid` with the knobs taken from a TilingConfig."""
    return choose_grid(width, height, cfg.tile_size, cfg.min_tiles, cfg.max_tiles)


def has_thumbnail(cols: int, rows: int, cfg: TilingConfig) -> bool:
    """Whether a grid gets the extra whole-image thumbnail tile."""
    return cfg.use_thumbnail and cols * rows > 1


def num_tiles(width: int, height: int, cfg: TilingConfig) -> int:
    """Number of tiles (thumbnail included) a width x height image becomes; 256 image tokens each in R1V3."""
    cols, rows = grid_for(width, height, cfg)
    return cols * rows + int(has_thumbnail(cols, rows, cfg))


def split_tiles(pixels: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """View an HWC image of size (rows*S, cols*S) as row-major tiles [rows, cols, C, S, S] (no copy)."""
    height, width, channels = pixels.shape
    tile = height // rows
    if height != rows * tile or width != cols * tile or tile != width // cols:
        raise ValueError(f"image {width}x{height} is not a {cols}x{rows} grid of square tiles")
    return pixels.reshape(rows, tile, cols, tile, channels).transpose(0, 2, 4, 1, 3)


def normalize_into(out: np.ndarray, pixels: np.ndarray, cfg: TilingConfig) -> None:
    """out[...] = (pixels / 255 - mean) / std in float32, the exact arithmetic of torchvision ToTensor + Normalize.

    numpy, not torch: identical float32 results, and on small CPU boxes several times faster than torch's
    threaded elementwise kernels (measured: 1.5 ms vs 8-40 ms for 4 tiles of 448 px).
    """
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    out[...] = pixels
    out /= np.float32(255)
    out -= mean
    out /= std


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Blend an image with alpha onto a white background (Pillow's masked paste, as vLLM does)."""
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _wide_grey_to_l(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer or float grey to 8 bits (Pillow's convert would clip at 255)."""
    arr = np.asarray(img)
    if img.mode == "F":
        out = np.clip(np.rint(arr), 0, 255)
    else:
        out = (np.clip(arr.astype(np.int64), 0, 65535) + 128) // 257
    return Image.fromarray(out.astype(np.uint8), "L")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation tag (1 = upright); unreadable EXIF counts as upright."""
    try:
        return int(img.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # malformed EXIF blocks raise assorted errors; the pixels are still fine
        return 1


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to upright 8-bit RGB by the project's one rule (module docstring)."""
    if _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _WIDE_GREY_MODES or img.mode == "F":
        img = _wide_grey_to_l(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        return _composite_on_white(img)
    return img if img.mode == "RGB" else img.convert("RGB")


def tile_image_pillow(img: Image.Image, cfg: TilingConfig) -> torch.Tensor:
    """Tile one image with Pillow bicubic resizing: float32 [n, 3, S, S], thumbnail last (reference path)."""
    img = to_rgb(img)
    cols, rows = grid_for(img.width, img.height, cfg)
    size = cfg.tile_size
    thumb = has_thumbnail(cols, rows, cfg)
    out = np.empty((cols * rows + int(thumb), 3, size, size), dtype=np.float32)
    resized = np.asarray(img.resize((size * cols, size * rows), Image.Resampling.BICUBIC))
    normalize_into(out[: cols * rows].reshape(rows, cols, 3, size, size), split_tiles(resized, cols, rows), cfg)
    if thumb:
        small = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC))
        normalize_into(out[-1:].reshape(1, 1, 3, size, size), split_tiles(small, 1, 1), cfg)
    return torch.from_numpy(out)


def denormalize_tiles(tiles: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    """Map normalised tiles back to 0..255 pixel units (float), for comparisons in pixel levels."""
    mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (tiles * std + mean) * 255
