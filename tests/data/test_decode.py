"""DALI decoding vs the Pillow reference: exact pixels on CPU, tiles within the documented resize tolerance,
and corrupt items named without losing the rest of the batch."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from megatron_r1v3.data.decode_pillow import ImageDecodeError, PillowImageDecoder, decode_rgb
from megatron_r1v3.data.tiling import TilingConfig, denormalize_tiles, num_tiles

dali = pytest.importorskip("megatron_r1v3.data.dali")
pytest.importorskip("nvidia.dali")

# Documented tolerance of DALI's cubic resize vs Pillow's bicubic, in pixel levels (0..255), see dali.py.
MEAN_TOL, MEAN_TOL_EXTREME, MAX_TOL, SHARE_OVER_2_TOL = 0.3, 1.0, 16.0, 0.001


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def scene(w: int, h: int, seed: int) -> Image.Image:
    """Photo-like content: smooth gradients, mild noise, a few hard-edged discs."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    base = np.stack([128 + 100 * np.sin(5 * x + 3 * y + p) for p in rng.uniform(0, 6, 3)], -1)
    img = Image.fromarray(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(2, max(3, min(w, h) // 3)))
        draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


SIZES = [(37, 91), (448, 448), (1000, 300), (5, 700)]


def varied_images() -> dict[str, bytes]:
    """One file per case the decoders must agree on."""
    items = {f"jpeg_{w}x{h}": encode(Image.fromarray(noise(w, h, w * h)), "JPEG", quality=90) for w, h in SIZES}
    items["jpeg_grey"] = encode(Image.fromarray(noise(60, 40, 1, 1), "L"), "JPEG")
    items["jpeg_cmyk"] = encode(Image.fromarray(noise(60, 40, 2)).convert("CMYK"), "JPEG")
    items["jpeg_progressive_444"] = encode(Image.fromarray(noise(61, 33, 3)), "JPEG", progressive=True, subsampling=0)
    items["png_rgb"] = encode(Image.fromarray(noise(50, 30, 4)), "PNG")
    items["png_palette"] = encode(Image.fromarray(noise(50, 30, 5)).quantize(200), "PNG")
    items["png_palette_4bit"] = encode(Image.fromarray(noise(50, 30, 6)).quantize(16), "PNG", bits=4)
    items["png_grey"] = encode(Image.fromarray(noise(50, 30, 7, 1), "L"), "PNG")
    items["png_rgba"] = encode(Image.fromarray(noise(50, 30, 8, 4), "RGBA"), "PNG")
    items["png_la"] = encode(Image.fromarray(noise(50, 30, 9, 2), "LA"), "PNG")
    items["png_palette_transparency"] = encode(Image.fromarray(noise(50, 30, 10)).quantize(64), "PNG", transparency=3)
    items["png_16bit_grey"] = encode(Image.fromarray(noise(50, 30, 11, 1).astype(np.uint16) * 257), "PNG")
    items["webp_lossy"] = encode(Image.fromarray(noise(50, 30, 12)), "WEBP", quality=80)
    items["webp_alpha"] = encode(Image.fromarray(noise(50, 30, 13, 4), "RGBA"), "WEBP", lossless=True)
    items["gif"] = encode(Image.fromarray(noise(50, 30, 14)).quantize(32), "GIF")
    items["bmp"] = encode(Image.fromarray(noise(50, 30, 15)), "BMP")
    for orientation in range(2, 9):  # DALI's adjust_orientation vs Pillow's exif_transpose
        items[f"jpeg_exif_{orientation}"] = encode(Image.fromarray(noise(50, 30, 16)), "JPEG", exif=exif(orientation))
    items["png_exif_6"] = encode(Image.fromarray(noise(50, 30, 17)), "PNG", exif=exif(6))
    return items


def exif(orientation: int) -> bytes:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags.tobytes()


@pytest.fixture(scope="module")
def decoder448():
    return dali.DaliImageDecoder(TilingConfig(tile_size=448), batch_size=4, num_threads=2, device="cpu")


@pytest.fixture(scope="module")
def decoder56():
    return dali.DaliImageDecoder(TilingConfig(tile_size=56), batch_size=4, num_threads=2, device="cpu")


def test_routing_decided_from_header():
    items = varied_images()
    native = {k for k, v in items.items() if dali.dali_decodes_exactly(v)}
    assert native == {
        "jpeg_37x91",
        "jpeg_448x448",
        "jpeg_1000x300",
        "jpeg_5x700",
        "jpeg_grey",
        "jpeg_cmyk",
        "jpeg_progressive_444",
        "png_rgb",
        "png_palette",
        "png_palette_4bit",
        "png_grey",
        "webp_lossy",
    } | {f"jpeg_exif_{o}" for o in range(2, 9)}
    assert not dali.dali_decodes_exactly(b"")
    assert not dali.dali_decodes_exactly(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)


def test_dali_cpu_decode_equals_pillow_exactly(decoder56):
    items = varied_images()
    decoded = decoder56.decode(list(items.values()), list(items))
    # DALI decoded every file it is routed (the Pillow fallback must not make this Pillow-vs-Pillow)
    by = dict(zip(items, decoder56.last_decoders))
    native = {k for k, v in items.items() if dali.dali_decodes_exactly(v)}
    assert len(native) == 19 and {by[k] for k in native} == {"dali"}, by
    assert {by[k] for k in set(items) - native} == {"pillow"}, by
    for (name, data), pixels in zip(items.items(), decoded):
        assert not isinstance(pixels, ImageDecodeError), pixels
        reference = decode_rgb(data)
        assert pixels.dtype == np.uint8 and pixels.shape == reference.shape, name
        assert np.array_equal(pixels, reference), name


def _levels(tiles: torch.Tensor, cfg: TilingConfig) -> torch.Tensor:
    return denormalize_tiles(tiles, cfg)


def _assert_within_tolerance(ours, ref, cfg, extreme, label):
    assert ours.shape == ref.shape, label
    diff = (_levels(ours, cfg) - _levels(ref, cfg)).abs()
    assert diff.mean().item() <= (MEAN_TOL_EXTREME if extreme else MEAN_TOL), (label, diff.mean().item())
    assert diff.max().item() <= MAX_TOL, (label, diff.max().item())
    if not extreme:
        assert (diff > 2.5).float().mean().item() <= SHARE_OVER_2_TOL, label


@pytest.mark.parametrize("tile", [448, 56])
def test_tiles_match_pillow_within_tolerance(tile, decoder448, decoder56):
    decoder = decoder448 if tile == 448 else decoder56
    cfg = decoder.cfg
    sizes = SIZES + [(640, 480), (300, 200)]
    items = [encode(scene(w, h, seed), "JPEG", quality=92) for seed, (w, h) in enumerate(sizes)]
    items.append(encode(scene(300, 200, 9), "JPEG", quality=92, exif=exif(6)))  # upright: 200x300
    sizes.append((200, 300))
    before = decoder.dali_decoded
    ours = decoder.decode_and_tile(items)
    assert decoder.last_decoders == ["dali"] * len(items) and decoder.dali_decoded - before == len(items)
    ref = PillowImageDecoder(cfg).decode_and_tile(items)
    for (w, h), a, b in zip(sizes, ours, ref):
        assert a.dtype == torch.float32 and a.shape[0] == num_tiles(w, h, cfg)
        extreme = max(w, h) / min(w, h) > 50  # 5x700: ~90x horizontal up-scaling
        _assert_within_tolerance(a, b, cfg, extreme, (w, h, tile))
    exact = sizes.index((448, 448))
    if tile == 448:  # no resize needed: only float rounding of the normalisation differs
        assert torch.allclose(ours[exact], ref[exact], atol=1e-5)


def test_host_decoded_formats_tile_like_pillow(decoder56):
    """Formats DALI would decode differently (alpha, 16-bit, GIF, BMP) take the reference decode, then DALI tiles."""
    base = scene(90, 50, 99)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 90, dtype=np.uint8), (50, 1)), "L")
    rgba = base.copy()
    rgba.putalpha(alpha)
    grey_alpha = base.convert("L")
    grey_alpha.putalpha(alpha)
    items = {
        "png_rgba": encode(rgba, "PNG"),
        "png_la": encode(grey_alpha, "PNG"),
        "png_palette_transparency": encode(base.quantize(64), "PNG", transparency=3),
        "png_16bit_grey": encode(Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257), "PNG"),
        "webp_alpha": encode(rgba, "WEBP", lossless=True),
        "gif": encode(base.quantize(64), "GIF"),
        "bmp": encode(base, "BMP"),
    }
    assert not any(dali.dali_decodes_exactly(v) for v in items.values())
    before = decoder56.host_decoded
    ours = decoder56.decode_and_tile(list(items.values()), list(items))
    assert decoder56.host_decoded - before == len(items) and decoder56.last_decoders == ["pillow"] * len(items)
    ref = PillowImageDecoder(decoder56.cfg).decode_and_tile(list(items.values()))
    for name, a, b in zip(items, ours, ref):
        _assert_within_tolerance(a, b, decoder56.cfg, False, name)


def _corrupt_jpeg(good: bytes) -> bytes:
    """Overwrite a Huffman table: neither libjpeg-turbo in DALI nor Pillow can decode it."""
    at = good.index(b"\xff\xc4")
    return good[: at + 4] + b"\xff" * 36 + good[at + 40 :]


@pytest.mark.parametrize("use_pillow", [False, True])
def test_bad_items_are_named_and_the_rest_decode(use_pillow, decoder56):
    goods = [encode(scene(w, h, s), "JPEG") for s, (w, h) in enumerate([(80, 60), (40, 90), (120, 30)])]
    truncated = goods[1][: len(goods[1]) // 2]
    batch = [goods[0], _corrupt_jpeg(goods[0]), goods[1], truncated, goods[2], b"not an image at all"]
    names = [f"shard/img{i}.jpg" for i in range(len(batch))]
    decoder = PillowImageDecoder(decoder56.cfg) if use_pillow else decoder56
    results = decoder.decode_and_tile(batch, names)
    if not use_pillow:
        assert decoder.last_decoders == ["dali", "error"] * 3
    for bad in (1, 3, 5):
        err = results[bad]
        assert isinstance(err, ImageDecodeError), (bad, err)
        assert err.index == bad and err.source == names[bad]
        assert f"image #{bad} (shard/img{bad}.jpg)" in str(err)
    assert "truncated" in str(results[3])
    alone = decoder.decode_and_tile([goods[0], goods[1], goods[2]])
    for good_at, single in zip((0, 2, 4), alone):
        assert isinstance(results[good_at], torch.Tensor)
        assert torch.equal(results[good_at], single)


def test_bad_item_in_later_batch_keeps_earlier_batches(decoder56):
    goods = [encode(scene(50 + 7 * i, 60, i), "JPEG") for i in range(9)]
    batch = goods[:6] + [goods[6][:100]] + goods[6:]
    results = decoder56.decode_and_tile(batch)
    assert [isinstance(r, ImageDecodeError) for r in results] == [False] * 6 + [True] + [False] * 3
    assert decoder56.last_decoders == ["dali"] * 6 + ["error"] + ["dali"] * 3
    ref = PillowImageDecoder(decoder56.cfg).decode_and_tile(goods)
    for a, b in zip(results[:6] + results[7:], ref):
        _assert_within_tolerance(a, b, decoder56.cfg, False, "batch")


def test_make_image_decoder_by_name():
    cfg = TilingConfig(tile_size=56)
    assert isinstance(dali.make_image_decoder("pillow", cfg), PillowImageDecoder)
    assert isinstance(dali.make_image_decoder("dali", cfg, device="cpu"), dali.DaliImageDecoder)
    with pytest.raises(ValueError):
        dali.make_image_decoder("opencv", cfg)
    with pytest.raises(ValueError):
        dali.DaliImageDecoder(cfg, device="tpu")


def test_default_device_follows_cuda():
    assert dali.default_device() == ("mixed" if torch.cuda.is_available() else "cpu")
