"""A vLLM-loadable model directory for our model: native InternVL config, tokenizer, processor, weights.

vLLM serves the transformers-native layout (`InternVLForConditionalGeneration`) with an `InternVLProcessor` =
`GotOcr2ImageProcessor` (dynamic tiling: `crop_to_patches`, thumbnail, ImageNet mean/std) + `InternVLVideoProcessor`.
The image processor's tile budget must equal the data pipeline's (`data.max_tiles`), or vLLM and the trainer cut an
image into different numbers of tiles and the token streams stop lining up.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_r1v3.bridge.hf_io import ASSET_NAMES, ShardedSafetensorsWriter, hf_config_from_model
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.data.tiling import IMAGENET_MEAN, IMAGENET_STD

LAYOUT = "native"  # the only layout vLLM has a config class for (platform.md)


def make_image_processor(model_cfg: ModelConfig, max_tiles: int):
    """The image processor vLLM serves our model with; the RL trainer tiles rollout images with this same object,
    so the pixels it trains on are the pixels the rollout engine saw (transformers' bicubic resize differs from
    our Pillow tiling by a few grey levels)."""
    from transformers import GotOcr2ImageProcessor

    size = {"height": model_cfg.vision.image_size, "width": model_cfg.vision.image_size}
    return GotOcr2ImageProcessor(size=size, crop_size=size, crop_to_patches=True, min_patches=1,
                                 max_patches=max_tiles, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def processor_files(out_dir: Path, model_cfg: ModelConfig, tokenizer_dir: Path, max_tiles: int) -> None:
    """Write processor_config.json (+ preprocessor / video configs) through transformers' own classes."""
    from transformers import AutoTokenizer, InternVLProcessor, InternVLVideoProcessor

    size = {"height": model_cfg.vision.image_size, "width": model_cfg.vision.image_size}
    image = make_image_processor(model_cfg, max_tiles)
    video = InternVLVideoProcessor(size=size, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    processor = InternVLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                                  image_seq_length=model_cfg.tokens_per_tile, chat_template=tokenizer.chat_template)
    processor.save_pretrained(str(out_dir))
    image.save_pretrained(str(out_dir))  # preprocessor_config.json, for readers that look for it alone
    video.save_pretrained(str(out_dir))


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer files verbatim (the trainer and vLLM must read the very same bytes)."""
    copied = []
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and (f.name in ASSET_NAMES or f.suffix == ".jinja") and "processor" not in f.name:
            shutil.copy2(f, out_dir / f.name)
            copied.append(f.name)
    if "tokenizer_config.json" not in copied:
        raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer_config.json (not a HF tokenizer directory)")
    return copied


def write_weights(out_dir: Path, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> list[str]:
    """Write `(hf_name, tensor)` pairs as safetensors in `dtype`; returns the names written."""
    writer = ShardedSafetensorsWriter(out_dir)
    for name, tensor in tensors:
        writer.add(name, tensor.to(dtype))
    writer.close()
    return writer.written


def random_hf_tensors(model_cfg: ModelConfig, seed: int) -> Iterable[tuple[str, torch.Tensor]]:
    """Random native-layout weights (shapes from transformers' model class), for an engine refit will overwrite."""
    from megatron_r1v3.bridge.random_hf import native_shapes, random_value

    for name, shape in native_shapes(model_cfg).items():
        yield name, random_value(name, shape, seed, torch.float32)


def write_vllm_model_dir(
    out_dir: str | Path,
    model_cfg: ModelConfig,
    tokenizer_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    max_tiles: int = 12,
    seed: int = 0,
) -> Path:
    """config.json + tokenizer + processor + weights (`weights` or random with `seed`); returns the directory.

    `weights` is any `(hf_name, tensor)` stream in the native layout, e.g. `bridge.export.iter_hf_tensors(chunks,
    model_cfg, "native")` consumed on the writing rank (that stream is collective: other ranks must drain it too).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_from_model(model_cfg, LAYOUT, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    processor_files(out, model_cfg, Path(tokenizer_dir), max_tiles)
    copy_tokenizer(Path(tokenizer_dir), out)
    gen = {"bos_token_id": model_cfg.bos_token_id, "eos_token_id": model_cfg.eos_token_id,
           "pad_token_id": model_cfg.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_weights(out, weights if weights is not None else random_hf_tensors(model_cfg, seed), dtype)
    return out
