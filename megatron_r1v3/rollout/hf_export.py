"""The ONE writer of servable HF model directories: the rollout engine's (`write_vllm_model_dir`) and the exported
checkpoint's (`r1v3 convert megatron-to-hf`, `write_serving_files`), so what vLLM reads during RL is what users get.

A servable directory holds, beside config.json and the weights: the tokenizer (vocabulary files copied verbatim;
tokenizer_config.json naming the image tokens, which HF's and vLLM's `InternVLProcessor` read as
`tokenizer.start_image_token` & co. and which Qwen2.5 / Skywork-R1V3 tokenizers do not declare: taken from the
model config's ids), the image processor config matching our tiling (`GotOcr2ImageProcessor`: tile size = the ViT
input, `data.max_tiles`, thumbnail, ImageNet mean/std), processor / video configs, the R1V3 chat template
(slow-thinking mode: the generation prompt ends with the `<think>\\n` prefill) and generation_config.json (eos
`<|im_end|>`, the recipe's temperature / top_p).

The image processor's tile budget must equal the data pipeline's (`data.max_tiles`), or vLLM and the trainer cut an
image into different numbers of tiles and the token streams stop lining up.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_r1v3.bridge.hf_io import ASSET_NAMES, ShardedSafetensorsWriter, hf_config_from_model
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.data.template import CHAT_TEMPLATE, IMAGE_PLACEHOLDER, IMG_CONTEXT
from megatron_r1v3.data.tiling import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from megatron_r1v3.config import RunConfig

LAYOUT = "native"  # the only layout vLLM has a config class for (platform.md)
VIDEO_TOKEN_CANDIDATES = ("<video>", "<|video_pad|>")  # InternVL "-hf" tokenizers, Qwen2.5's own video token
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                   "chat_template.json", "chat_template.jinja")
# the remote-code files InternVL / Skywork-R1V checkpoints ship, and the auto_map that names them
REMOTE_CODE_AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
REMOTE_CODE_FILES = ("configuration_internvl_chat.py", "configuration_intern_vit.py", "modeling_internvl_chat.py",
                     "modeling_intern_vit.py", "conversation.py")


class ServableError(ValueError):
    """A model directory that could not be made servable; the message names the file, field or token."""


def chat_template_for(layout: str) -> str:
    """The R1V3 chat template in a layout's image-placeholder convention: the native processor (HF, vLLM) expands
    `<IMG_CONTEXT>`; remote code (`model.chat`, vLLM's InternVL) replaces `<image>`."""
    if layout != "native":
        return CHAT_TEMPLATE
    image_part = f"'{IMAGE_PLACEHOLDER}\\n'"
    if image_part not in CHAT_TEMPLATE:
        raise AssertionError(f"data.template.CHAT_TEMPLATE no longer emits {image_part} for an image part")
    return CHAT_TEMPLATE.replace(image_part, f"'{IMG_CONTEXT}\\n'")


@dataclass(frozen=True)
class ServingSettings:
    """What a served model needs from the run beyond its weights: the tiling and the sampling defaults."""

    max_tiles: int = 12
    use_thumbnail: bool = True
    temperature: float = 1.0
    top_p: float = 1.0

    @classmethod
    def from_run(cls, cfg: RunConfig) -> ServingSettings:
        """data.max_tiles / use_thumbnail; the recipe's sampling temperature / top_p (rl.temperature, rl.top_p)."""
        return cls(max_tiles=cfg.data.max_tiles, use_thumbnail=cfg.data.use_thumbnail,
                   temperature=cfg.rl.temperature, top_p=cfg.rl.top_p)


def make_image_processor(model_cfg: ModelConfig, max_tiles: int, use_thumbnail: bool = True):
    """The image processor vLLM serves our model with; the RL trainer tiles rollout images with this same object,
    so the pixels it trains on are the pixels the rollout engine saw (transformers' bicubic resize differs from
    our Pillow tiling by a few grey levels). It always adds a thumbnail to multi-tile images."""
    from transformers import GotOcr2ImageProcessor

    if not use_thumbnail:
        raise ServableError("data.use_thumbnail=false cannot be served: transformers' and vLLM's InternVL image "
                            "processor (GotOcr2ImageProcessor) always adds the thumbnail tile")
    size = {"height": model_cfg.vision.image_size, "width": model_cfg.vision.image_size}
    return GotOcr2ImageProcessor(size=size, crop_size=size, crop_to_patches=True, min_patches=1,
                                 max_patches=max_tiles, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def image_token_names(tokenizer, model_cfg: ModelConfig, where: Path) -> dict[str, str]:
    """The named tokens InternVLProcessor reads, from the model config's ids (not from tokenizer attributes, which
    Qwen2.5-style tokenizers lack); the video token is the tokenizer's own, or the first single-token candidate."""
    names, errors = {}, []
    for name, field in (("start_image_token", "image_start_token_id"), ("end_image_token", "image_end_token_id"),
                        ("context_image_token", "image_context_token_id")):
        token_id = getattr(model_cfg, field)
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is None or tokenizer.convert_tokens_to_ids(token) != token_id \
                or tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            errors.append(f"model.{field}={token_id} is not a single added token of the tokenizer (got {token!r})")
        names[name] = token
    try:
        declared = tokenizer.video_token
    except AttributeError:  # transformers 5 raises for an undeclared named token
        declared = None
    for candidate in ([str(declared)] if declared else []) + list(VIDEO_TOKEN_CANDIDATES):
        if len(tokenizer.encode(candidate, add_special_tokens=False)) == 1:
            names["video_token"] = candidate
            break
    else:
        errors.append(f"no video token: none of {list(VIDEO_TOKEN_CANDIDATES)} is a single token (InternVLProcessor"
                      " needs one even for image-only use)")
    if errors:
        raise ServableError(f"tokenizer {where}: " + "; ".join(errors))
    return names


def servable_tokenizer_config(config: dict, names: dict[str, str], chat_template: str) -> dict:
    """tokenizer_config.json declaring the named image/video tokens (top-level `*_token` keys: transformers 5;
    the `extra_special_tokens` dict: transformers 4.5x, unless the file keeps a list there) and the chat template."""
    out = dict(config)
    out.update(names)
    extra = out.get("extra_special_tokens")
    if extra is None or isinstance(extra, dict):
        out["extra_special_tokens"] = {**(extra or {}), **names}
    out["chat_template"] = chat_template
    return out


def copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    """Copy the tokenizer's vocabulary files verbatim (the trainer and vLLM must read the very same bytes); the
    processor files and chat template are written, not copied."""
    copied = []
    for f in sorted(Path(tokenizer_dir).iterdir()):
        if f.is_file() and (f.name in ASSET_NAMES or f.suffix == ".jinja") and f.name not in PROCESSOR_FILES \
                and f.name != "generation_config.json":
            if out_dir.resolve() != f.parent.resolve():
                shutil.copy2(f, out_dir / f.name)
            copied.append(f.name)
    if "tokenizer_config.json" not in copied:
        raise ServableError(f"{tokenizer_dir}: no tokenizer_config.json (not a HF tokenizer directory)")
    return copied


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def generation_config(model_cfg: ModelConfig, serving: ServingSettings) -> dict:
    """generation_config.json: stop at `<|im_end|>` (the model's eos id), the recipe's sampling defaults."""
    gen = {"bos_token_id": model_cfg.bos_token_id, "eos_token_id": model_cfg.eos_token_id,
           "pad_token_id": model_cfg.pad_token_id, "do_sample": serving.temperature > 0,
           "temperature": serving.temperature, "top_p": serving.top_p}
    return gen


def processor_configs(model_cfg: ModelConfig, serving: ServingSettings) -> dict[str, dict]:
    """preprocessor_config.json, video_preprocessor_config.json and processor_config.json as transformers 5's
    `InternVLProcessor.save_pretrained` writes them (written as data: its video processor needs torchvision, which
    the trainer's venv lacks). `make_image_processor` builds the same image processor (tested equal)."""
    if not serving.use_thumbnail:
        make_image_processor(model_cfg, serving.max_tiles, serving.use_thumbnail)  # raises, naming the field
    size = {"height": model_cfg.vision.image_size, "width": model_cfg.vision.image_size}
    common = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
              "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD), "resample": 3,  # bicubic
              "rescale_factor": 1 / 255, "size": size}
    image = {**common, "crop_size": size, "crop_to_patches": True, "min_patches": 1, "max_patches": serving.max_tiles,
             "image_processor_type": "GotOcr2ImageProcessor"}
    video = {**common, "do_sample_frames": False, "initial_shift": True, "return_metadata": False,
             "video_processor_type": "InternVLVideoProcessor"}
    processor = {"image_processor": image, "video_processor": video, "image_seq_length": model_cfg.tokens_per_tile,
                 "processor_class": "InternVLProcessor"}
    return {"preprocessor_config.json": image, "video_preprocessor_config.json": video,
            "processor_config.json": processor}


def remote_code_missing(config: dict, directory: Path) -> list[str]:
    """The remote-code files a directory lacks: those its config's `auto_map` names, or (no auto_map) the standard
    InternVL set. Empty when it can load."""
    refs = [r for v in (config.get("auto_map") or {}).values() for r in (v if isinstance(v, list) else [v]) if r]
    needed = sorted({ref.split("--")[-1].split(".")[0] + ".py" for ref in refs}) or list(REMOTE_CODE_FILES)
    return [f for f in needed if not (Path(directory) / f).is_file()]


def remote_code_error(missing: list[str], where: Path) -> ServableError:
    """Why a remote-code export cannot load, and what to add."""
    return ServableError(
        f"the remote-code layout loads only with its Python files, which megatron_r1v3 cannot write (third-party"
        f" code); {where} lacks {', '.join(missing)}: copy them from the original InternVL / Skywork-R1V checkpoint"
        f" into the checkpoint's hf_assets/ (config.json then gets the auto_map {json.dumps(REMOTE_CODE_AUTO_MAP)}),"
        f" or export with --layout native")


def _finish_remote_config(out: Path, serving: ServingSettings) -> None:
    """Remote-code config.json: the tiling fields its code reads, and an auto_map whose files are present."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config.update(max_dynamic_patch=serving.max_tiles, use_thumbnail=serving.use_thumbnail, dynamic_image_size=True)
    missing = remote_code_missing(config, out)
    if missing:
        raise remote_code_error(missing, out)
    config.setdefault("auto_map", dict(REMOTE_CODE_AUTO_MAP))
    _write_json(path, config)


def check_servable(model_cfg: ModelConfig, tokenizer_dir: str | Path, layout: str, code_dir: str | Path,
                   config: dict | None = None) -> None:
    """Before a long conversion: raise ServableError / TokenizerError, naming what is missing, if the export could
    not be made servable (a tokenizer that does not load or match the model's ids; remote code absent)."""
    from megatron_r1v3.data.tokenizer import check_special_ids, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    check_special_ids(tokenizer, model_cfg)
    image_token_names(tokenizer, model_cfg, Path(tokenizer_dir))
    if layout != "native":
        missing = remote_code_missing(config or {}, Path(code_dir))
        if missing:
            raise remote_code_error(missing, Path(code_dir))


def write_serving_files(out_dir: str | Path, model_cfg: ModelConfig, tokenizer_dir: str | Path,
                        serving: ServingSettings, layout: str = LAYOUT) -> list[str]:
    """Everything a model directory needs besides weights and config.json: tokenizer, processor, chat template,
    generation config (and, for the remote layout, a checked auto_map). `tokenizer_dir` may be `out_dir` itself
    (an export whose tokenizer was copied there). Returns the file names written or copied."""
    from megatron_r1v3.data.tokenizer import check_special_ids, load_tokenizer

    out, src = Path(out_dir), Path(tokenizer_dir)
    tokenizer = load_tokenizer(src)
    check_special_ids(tokenizer, model_cfg)
    names = image_token_names(tokenizer, model_cfg, src)
    source_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    copied = copy_tokenizer(src, out)  # the vocabulary verbatim; the config is rewritten below
    for stale in PROCESSOR_FILES:
        (out / stale).unlink(missing_ok=True)
    template = chat_template_for(layout)
    _write_json(out / "tokenizer_config.json", servable_tokenizer_config(source_config, names, template))
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")  # transformers 5 prefers this file
    for name, data in processor_configs(model_cfg, serving).items():
        _write_json(out / name, data)
    _write_json(out / "generation_config.json", generation_config(model_cfg, serving))
    if layout != "native":
        _finish_remote_config(out, serving)
    return sorted({*copied, "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   *(f for f in PROCESSOR_FILES if (out / f).is_file())})


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
    serving: ServingSettings | None = None,
) -> Path:
    """config.json + `write_serving_files` + weights (`weights` or random with `seed`); returns the directory.

    `serving` (default: `max_tiles`, the other fields' defaults) should be `ServingSettings.from_run(cfg)`.
    `weights` is any `(hf_name, tensor)` stream in the native layout, e.g. `bridge.export.iter_hf_tensors(chunks,
    model_cfg, "native")` consumed on the writing rank (that stream is collective: other ranks must drain it too).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config_from_model(model_cfg, LAYOUT, dtype)
    _write_json(out / "config.json", config)
    write_serving_files(out, model_cfg, tokenizer_dir, serving or ServingSettings(max_tiles=max_tiles), LAYOUT)
    write_weights(out, weights if weights is not None else random_hf_tensors(model_cfg, seed), dtype)
    return out
