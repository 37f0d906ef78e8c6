"""InternVL dynamic tiling: grid choice, tile layout, normalisation and the RGB rule."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_r1v3.data.tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TilingConfig,
    candidate_grids,
    choose_grid,
    denormalize_tiles,
    num_tiles,
    tile_image_pillow,
    to_rgb,
)


def reference_grid(width, height, tile, lo, hi):
    """InternVL's rule restated independently: scan candidates sorted by tile count, ties to the later one
    when the image area exceeds half the candidate's pixel area."""
    ratios = sorted(
        {(i, j) for n in range(lo, hi + 1) for i in range(1, n + 1) for j in range(1, n + 1) if lo <= i * j <= hi},
        key=lambda r: r[0] * r[1],
    )
    best, best_diff = (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(width / height - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def test_candidates_cover_budget_sorted_by_tile_count():
    grids = candidate_grids(1, 12)
    assert set(grids) == {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    counts = [c * r for c, r in grids]
    assert counts == sorted(counts)
    assert set(candidate_grids(2, 4)) == {(1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2)}


@pytest.mark.parametrize(
    "size,expected",
    [
        ((448, 448), (1, 1)),  # square, small: tie among 1x1/2x2/3x3 stays at 1x1
        ((896, 896), (2, 2)),  # area > 0.5*448^2*4 -> 2x2 wins the tie, not > half of 3x3
        ((2000, 2000), (3, 3)),
        ((896, 448), (2, 1)),
        ((1000, 300), (3, 1)),
        ((37, 91), (2, 5)),  # aspect 0.407: 2/5 is off by 0.007
        ((5, 700), (1, 12)),
        ((700, 5), (12, 1)),
        ((1, 1), (1, 1)),
    ],
)
def test_choose_grid_known_cases(size, expected):
    assert choose_grid(*size) == expected


def test_choose_grid_matches_reference_on_many_sizes():
    rng = np.random.default_rng(0)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 3000, size=(400, 2))]
    sizes += [(448 * i, 448 * j) for i in range(1, 7) for j in range(1, 7)]
    sizes += [(224 * i, 224 * j) for i in range(1, 9) for j in range(1, 9)]  # exact-ratio ties at many areas
    for tile, lo, hi in [(448, 1, 12), (448, 1, 6), (56, 1, 12), (448, 2, 9)]:
        for w, h in sizes:
            assert choose_grid(w, h, tile, lo, hi) == reference_grid(w, h, tile, lo, hi), (w, h, tile, lo, hi)


def test_tile_size_enters_tie_break():
    # 112x112 ties 1x1 / 2x2 / 3x3: with 56 px tiles its area 12544 beats half of 2x2 (6272), not of 3x3 (14112)
    assert choose_grid(112, 112, tile=56) == (2, 2)
    assert choose_grid(113, 113, tile=56) == (2, 2)
    assert choose_grid(119, 119, tile=56) == (3, 3)  # 14161 > 14112
    assert choose_grid(112, 112, tile=448) == (1, 1)


def test_num_tiles_counts_thumbnail_only_for_multi_tile():
    cfg = TilingConfig()
    assert num_tiles(448, 448, cfg) == 1
    assert num_tiles(896, 896, cfg) == 5
    assert num_tiles(896, 896, TilingConfig(use_thumbnail=False)) == 4
    assert num_tiles(56, 56, TilingConfig(tile_size=56)) == 1


def test_config_validates():
    with pytest.raises(ValueError):
        TilingConfig(min_tiles=3, max_tiles=2)
    with pytest.raises(ValueError):
        TilingConfig(tile_size=0)
    with pytest.raises(ValueError):
        choose_grid(0, 10)


def _torchvision_normalize(pixels_hwc: np.ndarray) -> torch.Tensor:
    """ToTensor + Normalize as torchvision computes them (float32 div 255, sub mean, div std)."""
    t = torch.from_numpy(np.array(pixels_hwc)).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return t.sub_(mean).div_(std)


def test_tiles_are_row_major_crops_then_thumbnail_bit_exact():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (100, 170, 3), dtype=np.uint8))
    cfg = TilingConfig(tile_size=56, max_tiles=6)
    cols, rows = choose_grid(170, 100, 56, 1, 6)
    assert (cols, rows) == (3, 2)  # aspect 1.7: 3/2 is off by 0.2, 2/1 by 0.3
    tiles = tile_image_pillow(img, cfg)
    assert tiles.dtype == torch.float32 and tiles.shape == (cols * rows + 1, 3, 56, 56)
    resized = img.resize((56 * cols, 56 * rows), Image.Resampling.BICUBIC)
    for k in range(cols * rows):
        x, y = (k % cols) * 56, (k // cols) * 56
        crop = np.asarray(resized.crop((x, y, x + 56, y + 56)))
        assert torch.equal(tiles[k], _torchvision_normalize(crop))
    thumb = np.asarray(img.resize((56, 56), Image.Resampling.BICUBIC))
    assert torch.equal(tiles[-1], _torchvision_normalize(thumb))


def test_single_tile_has_no_thumbnail_and_exact_size_is_identity():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
    tiles = tile_image_pillow(Image.fromarray(pixels), TilingConfig(tile_size=56))
    assert tiles.shape == (1, 3, 56, 56)
    assert torch.equal(tiles[0], _torchvision_normalize(pixels))
    back = denormalize_tiles(tiles, TilingConfig(tile_size=56))[0].permute(1, 2, 0).numpy()
    assert np.abs(back - pixels).max() < 1e-3


def test_no_thumbnail_when_disabled():
    img = Image.new("RGB", (120, 56), (10, 20, 30))
    assert tile_image_pillow(img, TilingConfig(tile_size=56, use_thumbnail=False)).shape[0] == 2
    assert tile_image_pillow(img, TilingConfig(tile_size=56)).shape[0] == 3


def test_rgb_rule_alpha_composited_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (10, 200, 30, 255)  # opaque -> unchanged
    rgba[0, 2] = (0, 100, 255, 128)  # half: (c*a + 255*(255-a) + 127) // 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [10, 200, 30]
    exact = np.array([c * 128 / 255 + 255 * 127 / 255 for c in (0, 100, 255)])
    assert np.abs(out[0, 2] - exact).max() <= 1
    la = Image.fromarray(np.array([[[0, 0], [50, 255]]], dtype=np.uint8), "LA")
    assert np.asarray(to_rgb(la)).tolist() == [[[255, 255, 255], [50, 50, 50]]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_rgb_rule_applies_exif_orientation(orientation):
    pixels = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    upright = np.asarray(to_rgb(Image.open(buf)))
    expected = {
        1: pixels,
        2: pixels[:, ::-1],
        3: pixels[::-1, ::-1],
        4: pixels[::-1],
        5: pixels.transpose(1, 0, 2),
        6: np.rot90(pixels, -1),
        7: pixels[::-1, ::-1].transpose(1, 0, 2),
        8: np.rot90(pixels, 1),
    }[orientation]
    assert np.array_equal(upright, expected)
    assert (
        num_tiles(*Image.fromarray(upright).size, TilingConfig(tile_size=2))
        == tile_image_pillow(Image.open(buf), TilingConfig(tile_size=2)).shape[0]
    )


def test_rgb_rule_palette_transparency_grey_cmyk_and_16bit():
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    assert np.asarray(to_rgb(pal)).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    grey = Image.fromarray(np.array([[0, 77, 255]], dtype=np.uint8), "L")
    assert np.asarray(to_rgb(grey)).tolist() == [[[0, 0, 0], [77, 77, 77], [255, 255, 255]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk)).tolist() == [[[255, 0, 0]]]
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert wide.mode.startswith("I")
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255]
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is rgb
