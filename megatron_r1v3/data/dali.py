"""Image decoding and InternVL tiling with NVIDIA DALI (nvJPEG on GPU machines, libjpeg-turbo on CPU).

One call, `DaliImageDecoder.decode_and_tile(list_of_bytes)`, returns per image the float32 [n, 3, S, S] tiles
of `tiling.tile_image_pillow`, computed inside DALI: decode -> bicubic resize to the grid chosen by the shared
`tiling.choose_grid` -> ImageNet normalise -> cut into tiles -> (thumbnail). Images are decoded by DALI only
when DALI yields exactly the pixels of the RGB rule (`tiling.to_rgb`, EXIF orientation included): JPEG,
opaque PNG up to 8 bits and opaque still WebP, without PNG/WebP EXIF. Alpha/colour-key PNG and WebP, 16-bit
PNG, PNG/WebP with EXIF and other formats are decoded by the Pillow reference on the host and then tiled by
DALI, so both decoders see the same RGB pixels.

Tolerance: on CPU, decoded pixels equal Pillow's bit for bit. DALI's cubic resize (float accumulation, one
rounding) is not Pillow's bicubic (fixed point, weights renormalised at the borders, uint8 between the two
passes), so tiles differ from `tile_image_pillow` by, in pixel levels of 255 (measured on photo-like JPEGs,
tiles 448 and 56): mean 0.1-0.21, fewer than 0.03% of values off by more than 2 levels, a few edge pixels
up to 9; extreme up-scaling (5x700 px -> 1x12 tiles) mean 0.7, max 10. tests/data/test_decode.py enforces mean
<= 0.3 (1.0 extreme), max <= 16, <= 0.1% over 2.5 levels. An image that needs no resize matches to float
rounding. GPU decoding (nvJPEG, device="mixed") is not bit-exact with libjpeg-turbo either; it is untested here.
A decoder holds DALI pipelines: use one per thread / DataLoader worker.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Sequence

import numpy as np
import torch

from megatron_r1v3.data.decode_pillow import ImageDecodeError, PillowImageDecoder, decode_rgb, source_names
from megatron_r1v3.data.tiling import TilingConfig, grid_for, has_thumbnail

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def dali_available() -> bool:
    """Whether the DALI wheel imports on this machine."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def default_device() -> str:
    """Device for DALI decoding: "mixed" (nvJPEG decode, GPU ops) when a GPU is visible, else "cpu"."""
    return "mixed" if torch.cuda.is_available() else "cpu"


def _png_is_plain(data: bytes) -> bool:
    """PNG without alpha, colour key, animation or EXIF, at most 8 bits per sample."""
    if len(data) < 33 or data[12:16] != b"IHDR" or data[24] > 8 or data[25] not in (0, 2, 3):
        return False
    pos = 8
    while pos + 8 <= len(data):
        kind = data[pos + 4 : pos + 8]
        if kind in (b"tRNS", b"acTL", b"eXIf"):
            return False
        if kind == b"IDAT":
            return True
        pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    return False


def _webp_is_plain(data: bytes) -> bool:
    """Still WebP without alpha or EXIF."""
    kind = data[12:16]
    if kind == b"VP8 ":
        return True
    if kind == b"VP8L" and len(data) >= 25:
        return not (int.from_bytes(data[21:25], "little") >> 28) & 1
    if kind == b"VP8X" and len(data) >= 21:
        return not data[20] & 0x1A  # alpha, EXIF or animation flag
    return False


def dali_decodes_exactly(data: bytes) -> bool:
    """True when DALI's RGB decode equals `tiling.to_rgb` for this file (decided from the header alone)."""
    if data[:3] == b"\xff\xd8\xff":
        return True
    if data[:8] == _PNG_SIGNATURE:
        return _png_is_plain(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_is_plain(data)
    return False


class _Runner:
    """One DALI pipeline whose external_source pulls batches from a queue; rebuilt after any failure."""

    def __init__(self, graph: Callable, num_inputs: int, layouts: Sequence[str | None], opts: dict) -> None:
        self.graph, self.num_inputs, self.layouts, self.opts = graph, num_inputs, list(layouts), opts
        self._pending: deque = deque()
        self._pipe = None

    def _next_batch(self) -> tuple:
        if not self._pending:
            raise StopIteration
        return self._pending.popleft()

    def _build(self):
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(enable_conditionals=True, **self.opts)
        def pipe():
            inputs = fn.external_source(
                source=self._next_batch, num_outputs=self.num_inputs, batch=True, layout=self.layouts
            )
            return self.graph(*inputs)

        built = pipe()
        built.build()
        return built

    def run(self, batches: list[tuple]) -> list[list[torch.Tensor]]:
        """Run every batch, in order; returns per batch the samples of the first output as torch tensors.

        On a DALI error raises `_BatchError` carrying how many batches completed before it.
        """
        done: list[list[torch.Tensor]] = []
        if self._pipe is None:
            self._pipe = self._build()
        self._pending = deque(batches)
        try:
            while True:
                (out,) = self._pipe.run()
                done.append([torch.from_dlpack(out[i]) for i in range(len(out))])
        except StopIteration:
            self._pipe.reset()
            return done
        except RuntimeError as exc:
            self._pipe, self._pending = None, deque()  # DALI marks a failed pipeline invalid
            raise _BatchError(len(done), done, exc) from exc


class _BatchError(Exception):
    """A DALI run failed at batch `failed` (earlier batches' outputs are in `done`)."""

    def __init__(self, failed: int, done: list, cause: Exception) -> None:
        super().__init__(str(cause))
        self.failed, self.done, self.cause = failed, done, cause


def _dali_reason(exc: Exception) -> str:
    """DALI error messages repeat the pipeline traceback; keep the informative tail."""
    text = " ".join(str(exc).split())
    marker = "encountered:"
    if marker in text:
        text = text.split(marker, 1)[1].replace("Current pipeline object is no longer valid.", "")
    text = re.sub(r"sample #\d+", "the image", text).strip(" :")
    return text or type(exc).__name__


class DaliImageDecoder:
    """Decode + tile + normalise a list of encoded images with DALI; bad items come back as errors."""

    def __init__(
        self,
        cfg: TilingConfig,
        batch_size: int = 16,
        num_threads: int = 2,
        device: str | None = None,
        prefetch_queue_depth: int = 2,
    ) -> None:
        if not dali_available():
            raise ImportError("DALI is not installed: pip install nvidia-dali-cuda130 (or use data.decoder=pillow)")
        device = device or default_device()
        if device not in ("cpu", "mixed", "gpu"):
            raise ValueError(f"device must be cpu, mixed or gpu, got {device!r}")
        self.cfg, self.batch_size = cfg, batch_size
        self.device = "mixed" if device == "gpu" else device
        device_id = torch.cuda.current_device() if self.device == "mixed" else None
        opts = dict(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            prefetch_queue_depth=prefetch_queue_depth,
        )
        self._peek = _Runner(self._peek_graph, 1, [None], opts)
        self._decode = _Runner(self._decode_graph, 1, [None], opts)
        extra = 3 if cfg.use_thumbnail else 2  # size, grid shape (, thumbnail flag)
        self._tile_encoded = _Runner(self._tile_graph_encoded, 1 + extra, [None] * (1 + extra), opts)
        self._tile_pixels = _Runner(self._tile_graph_pixels, 1 + extra, ["HWC"] + [None] * extra, opts)
        self.host_decoded = 0  # images decoded by the Pillow reference (alpha, 16-bit, other formats, DALI errors)
        self.dali_decoded = 0  # images DALI itself decoded
        # per item of the last call: "dali", "pillow" (the host fallback) or "error"; lets tests prove DALI ran
        self.last_decoders: list[str] = []

    # ---- DALI graphs -------------------------------------------------------------------------------------
    def _decoded(self, encoded):
        from nvidia.dali import fn, types

        return fn.decoders.image(encoded, device=self.device, output_type=types.RGB, adjust_orientation=True)

    def _peek_graph(self, encoded):
        from nvidia.dali import fn

        return fn.peek_image_shape(encoded, adjust_orientation=True)

    def _decode_graph(self, encoded):
        return self._decoded(encoded)

    def _tile_graph_encoded(self, encoded, size, grid_shape, multi=None):
        return self._tile_graph(self._decoded(encoded), size, grid_shape, multi)

    def _tile_graph_pixels(self, pixels, size, grid_shape, multi=None):
        return self._tile_graph(pixels.gpu() if self.device == "mixed" else pixels, size, grid_shape, multi)

    def _tile_graph(self, images, size, grid_shape, multi=None):
        """HWC uint8 -> [n, 3, S, S] float32: resize to the grid, cut tiles, append the thumbnail, normalise.

        Tiles are cut and concatenated while still uint8 (cheap copies); one crop_mirror_normalize then
        converts the whole [n, S, S, 3] stack to normalised float CHW.
        """
        from nvidia.dali import fn, types

        tile = self.cfg.tile_size

        def resize(img, target):
            return fn.resize(img, size=target, interp_type=types.INTERP_CUBIC, antialias=True)

        grid = fn.reshape(resize(images, size), shape=grid_shape, layout="")  # [rows, S, cols, S, 3]
        tiles = fn.reshape(fn.transpose(grid, perm=[0, 2, 1, 3, 4]), shape=[-1, tile, tile, 3], layout="FHWC")
        if self.cfg.use_thumbnail:
            if multi:  # per-sample DALI conditional: only multi-tile images pay for the thumbnail
                thumb = fn.reshape(resize(images, [tile, tile]), shape=[1, tile, tile, 3], layout="FHWC")
                tiles = fn.cat(tiles, thumb, axis=0)
        return fn.crop_mirror_normalize(
            tiles,
            dtype=types.FLOAT,
            mean=[255.0 * m for m in self.cfg.mean],
            std=[255.0 * s for s in self.cfg.std],
            output_layout="FCHW",
        )

    # ---- batching with per-item fallback -----------------------------------------------------------------
    def _run_items(self, runner: _Runner, jobs: list[tuple], results: list) -> dict[int, str]:
        """Run jobs (index, *inputs) in batches into results[index]; returns {index: DALI error} for bad items.

        DALI fails a whole batch on one bad image, so a failing batch is re-run item by item to find it.
        """
        failed: dict[int, str] = {}
        batches = [jobs[i : i + self.batch_size] for i in range(0, len(jobs), self.batch_size)]
        while batches:
            packed = [tuple(list(col) for col in zip(*[job[1:] for job in batch])) for batch in batches]
            try:
                outs, bad, rest = runner.run(packed), None, []
            except _BatchError as err:
                outs, bad, rest = err.done, batches[err.failed], batches[err.failed + 1 :]
                if len(bad) == 1:
                    failed[bad[0][0]] = _dali_reason(err.cause)
                else:
                    for job in bad:
                        failed.update(self._run_items(runner, [job], results))
            for batch, out in zip(batches, outs):
                for job, tensor in zip(batch, out):
                    results[job[0]] = tensor
            batches = rest
        return failed

    def _split(self, items: Sequence[bytes]) -> tuple[list[tuple], list[int]]:
        """Route items: (index, bytes) jobs DALI decodes exactly, and indices the host must decode."""
        dali_jobs, host = [], []
        for index, data in enumerate(items):
            if dali_decodes_exactly(data):
                dali_jobs.append((index, np.frombuffer(data, dtype=np.uint8)))
            else:
                host.append(index)
        return dali_jobs, host

    def _host_decode(
        self, items: Sequence[bytes], indices: list[int], names: list, dali_errors: dict[int, str], results: list
    ) -> dict[int, np.ndarray]:
        """Reference-decode items on the host; undecodable ones become ImageDecodeErrors in results."""
        pixels = {}
        for index in indices:
            try:
                pixels[index] = decode_rgb(items[index], index, names[index])
            except ImageDecodeError as exc:
                reason = exc.reason
                if index in dali_errors:
                    reason = f"DALI: {dali_errors[index]}; Pillow: {reason}"
                results[index] = ImageDecodeError(index, names[index], reason)
        self.host_decoded += len(pixels)
        return pixels

    def _account(self, dali_jobs: list[tuple], dali_errors: dict[int, str], pixels: dict, n: int) -> None:
        """Record which decoder handled each item of this call (the silent Pillow fallback stays visible)."""
        by = ["error"] * n
        for index, _ in dali_jobs:
            if index not in dali_errors:
                by[index] = "dali"
        for index in pixels:
            by[index] = "pillow"
        self.dali_decoded += by.count("dali")
        self.last_decoders = by

    def _tile_job(self, index: int, first, height: int, width: int) -> tuple:
        cols, rows = grid_for(width, height, self.cfg)
        tile = self.cfg.tile_size
        size = np.array([rows * tile, cols * tile], dtype=np.float32)
        grid_shape = np.array([rows, tile, cols, tile, 3], dtype=np.int32)
        if not self.cfg.use_thumbnail:
            return (index, first, size, grid_shape)
        return (index, first, size, grid_shape, np.array(has_thumbnail(cols, rows, self.cfg)))

    def decode_and_tile(
        self, items: Sequence[bytes], sources: Sequence[str] | None = None
    ) -> list[torch.Tensor | ImageDecodeError]:
        """Per item: float32 [n_i, 3, S, S] tiles (thumbnail last), or the ImageDecodeError naming that item.

        Items DALI cannot decode are retried with the Pillow reference (so both paths accept the same files);
        an item only becomes an error when Pillow cannot decode it either.
        """
        names = source_names(len(items), sources)
        results: list = [None] * len(items)
        dali_jobs, host = self._split(items)
        shapes: list = [None] * len(items)
        dali_errors = self._run_items(self._peek, dali_jobs, shapes)
        encoded_jobs = [
            self._tile_job(index, data, int(shapes[index][0]), int(shapes[index][1]))
            for index, data in dali_jobs
            if index not in dali_errors
        ]
        dali_errors.update(self._run_items(self._tile_encoded, encoded_jobs, results))
        pixels = self._host_decode(items, sorted(host + list(dali_errors)), names, dali_errors, results)
        self._account(dali_jobs, dali_errors, pixels, len(items))
        pixel_jobs = [self._tile_job(index, arr, *arr.shape[:2]) for index, arr in pixels.items()]
        self._run_items(self._tile_pixels, pixel_jobs, results)
        return results

    def decode(
        self, items: Sequence[bytes], sources: Sequence[str] | None = None
    ) -> list[np.ndarray | ImageDecodeError]:
        """Decode only: RGB uint8 HWC arrays, or per-item errors; used to check DALI against Pillow."""
        names = source_names(len(items), sources)
        results: list = [None] * len(items)
        dali_jobs, host = self._split(items)
        dali_errors = self._run_items(self._decode, dali_jobs, results)
        results = [r if r is None else r.cpu().numpy() for r in results]  # zero-copy on CPU
        pixels = self._host_decode(items, sorted(host + list(dali_errors)), names, dali_errors, results)
        self._account(dali_jobs, dali_errors, pixels, len(items))
        for index, arr in pixels.items():
            results[index] = arr
        return results


def make_image_decoder(
    decoder: str,
    cfg: TilingConfig,
    batch_size: int = 16,
    num_threads: int = 2,
    device: str | None = None,
    prefetch_queue_depth: int = 2,
) -> DaliImageDecoder | PillowImageDecoder:
    """Build the decoder named by `data.decoder`: "dali" (default) or the Pillow fallback "pillow"."""
    if decoder == "dali":
        return DaliImageDecoder(cfg, batch_size, num_threads, device, prefetch_queue_depth)
    if decoder == "pillow":
        return PillowImageDecoder(cfg, num_threads)
    raise ValueError(f"data.decoder must be 'dali' or 'pillow', got {decoder!r}")
