"""HF checkpoints on disk: layout detection, config <-> ModelConfig, lazy tensor reads, size-bounded sharded writes.

Reads are per tensor (plain reads at the header's offsets), so no process ever holds a whole checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from megatron_r1v3.bridge.mapping import MappingError
from megatron_r1v3.config import ConnectorConfig, LanguageConfig, ModelConfig, VisionConfig

INDEX = "model.safetensors.index.json"
# Files copied verbatim between HF and Megatron checkpoints (tokenizer, processor, chat template, remote code).
ASSET_SUFFIXES = (".py", ".jinja", ".model", ".tiktoken", ".txt")
ASSET_NAMES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json",
               "chat_template.json", "generation_config.json", "video_preprocessor_config.json"}
_REMOTE_TYPES = {"internvl_chat", "skywork_chat"}
_REMOTE_ARCHS = {"InternVLChatModel", "SkyworkR1VChatModel"}


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class HFFormatError(ValueError):
    """An HF checkpoint we cannot read or do not support; the message names the file and field."""


# transformers' `save_pretrained` stores InternVLForConditionalGeneration under its checkpoint names (every
# published `-hf` InternVL checkpoint, and transformers 5.x's own saves), not the in-memory module paths the
# mapping table spells: the one normalisation from stored to canonical names (native layout only).
NATIVE_SAVED_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def canonical_name(stored: str, layout: str) -> str:
    """The mapping table's name of a tensor as a checkpoint of `layout` stores it."""
    if layout == "native":
        for saved, canonical in NATIVE_SAVED_PREFIXES:
            if stored.startswith(saved):
                return canonical + stored[len(saved):]
    return stored


def stored_name(canonical: str, layout: str) -> str:
    """The name `save_pretrained` gives a tensor of `layout` on disk: what our writers write (inverse of
    `canonical_name`), so an exported checkpoint reads like one transformers saved."""
    if layout == "native":
        for saved, name in NATIVE_SAVED_PREFIXES:
            if canonical.startswith(name):
                return saved + canonical[len(name):]
    return canonical


def detect_layout(config: dict, path: str | Path = "config.json") -> str:
    """'remote' (InternVL chat / Skywork-R1V remote code) or 'native' (InternVLForConditionalGeneration)."""
    archs = set(config.get("architectures") or [])
    mtype = config.get("model_type")
    if mtype in _REMOTE_TYPES or archs & _REMOTE_ARCHS:
        return "remote"
    if mtype == "internvl" or "InternVLForConditionalGeneration" in archs:
        return "native"
    raise HFFormatError(
        f"{path}: unknown architecture (model_type={mtype!r}, architectures={sorted(archs)}); supported:"
        f" model_type internvl (InternVLForConditionalGeneration) or {sorted(_REMOTE_TYPES)} (remote code)"
    )


def _require(cond: bool, path, field: str, value, want: str) -> None:
    if not cond:
        raise HFFormatError(f"{path}: unsupported {field}={value!r} (megatron_r1v3 supports {want})")


def _pair(x) -> int:
    return int(x[0]) if isinstance(x, (list, tuple)) else int(x)


def _rope_theta(text: dict) -> float:
    rope = text.get("rope_parameters") or {}
    return float(text.get("rope_theta") or rope.get("rope_theta") or 10000.0)


def _added_token_ids(hf_dir: Path) -> dict[str, int]:
    """Special-token ids from tokenizer.json (`<img>`, `</img>`, `<IMG_CONTEXT>`, ...), empty without one."""
    tok = hf_dir / "tokenizer.json"
    if not tok.is_file():
        return {}
    return {t["content"]: int(t["id"]) for t in json.loads(tok.read_text()).get("added_tokens", [])}


def model_config_from_hf(config: dict, layout: str, hf_dir: Path) -> ModelConfig:
    """Translate an HF config.json to our ModelConfig; unsupported variants fail naming the field."""
    path = hf_dir / "config.json"
    if layout == "native":
        vis, text = config["vision_config"], config["text_config"]
        _require(vis.get("norm_type", "layer_norm") == "rms_norm", path, "vision_config.norm_type",
                 vis.get("norm_type"), "rms_norm (InternViT-6B)")
        _require(not vis.get("attention_bias", False), path, "vision_config.attention_bias", True, "false")
        _require(vis.get("use_mean_pooling", True), path, "vision_config.use_mean_pooling", False,
                 "true (no final vision LayerNorm)")
        qk_norm, ls_init = bool(vis.get("use_qk_norm", False)), float(vis.get("layer_scale_init_value", 0.1))
        image_token = int(config.get("image_token_id", 151667))
        tie = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    else:
        vis, text = config["vision_config"], config["llm_config"]
        _require(vis.get("norm_type", "rms_norm") == "rms_norm", path, "vision_config.norm_type",
                 vis.get("norm_type"), "rms_norm (InternViT-6B)")
        _require(not vis.get("qkv_bias", False), path, "vision_config.qkv_bias", True, "false")
        _require(config.get("ps_version", "v2") == "v2", path, "ps_version", config.get("ps_version"), "v2")
        _require(config.get("select_layer", -1) == -1, path, "select_layer", config.get("select_layer"), "-1")
        qk_norm, ls_init = bool(vis.get("qk_normalization", False)), float(vis.get("initializer_factor", 0.1))
        image_token = int(config.get("img_context_token_id")
                          or _added_token_ids(hf_dir).get("<IMG_CONTEXT>", 151667))
        tie = bool(text.get("tie_word_embeddings", False))
    _require(text.get("model_type", "qwen2") == "qwen2", path, "text/llm_config.model_type",
             text.get("model_type"), "qwen2")
    heads = int(vis["num_attention_heads"])
    vision = VisionConfig(
        image_size=_pair(vis.get("image_size", 448)), patch_size=_pair(vis.get("patch_size", 14)),
        hidden_size=int(vis["hidden_size"]), num_layers=int(vis["num_hidden_layers"]), num_heads=heads,
        ffn_hidden_size=int(vis["intermediate_size"]), norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
        layer_scale_init=ls_init, qk_normalization=qk_norm, head_pad_multiple=8 if heads % 8 else 1,
    )
    language = LanguageConfig(
        num_layers=int(text["num_hidden_layers"]), hidden_size=int(text["hidden_size"]),
        ffn_hidden_size=int(text["intermediate_size"]), num_heads=int(text["num_attention_heads"]),
        num_kv_heads=int(text.get("num_key_value_heads") or text["num_attention_heads"]),
        vocab_size=int(text["vocab_size"]), max_position_embeddings=int(text.get("max_position_embeddings", 32768)),
        rope_theta=_rope_theta(text), norm_eps=float(text.get("rms_norm_eps", 1e-6)), tie_embeddings=tie,
    )
    eos = text.get("eos_token_id", 151645)
    added = _added_token_ids(hf_dir)
    return ModelConfig(
        preset="hf", vision=vision,
        connector=ConnectorConfig(downsample_ratio=float(config.get("downsample_ratio", 0.5))),
        language=language, image_context_token_id=image_token,
        image_start_token_id=added.get("<img>", 151665), image_end_token_id=added.get("</img>", 151666),
        bos_token_id=int(text.get("bos_token_id") or 151643),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
    )


def hf_config_from_model(model: ModelConfig, layout: str, dtype: torch.dtype) -> dict:
    """config.json for our model in an HF layout (native: validated through transformers' InternVLConfig)."""
    v, lm = model.vision, model.language
    dtype_name = str(dtype).replace("torch.", "")
    text = dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=lm.hidden_size,
        intermediate_size=lm.ffn_hidden_size, num_hidden_layers=lm.num_layers, num_attention_heads=lm.num_heads,
        num_key_value_heads=lm.num_kv_heads, vocab_size=lm.vocab_size, rms_norm_eps=lm.norm_eps,
        rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings, hidden_act="silu",
        tie_word_embeddings=lm.tie_embeddings, bos_token_id=model.bos_token_id, eos_token_id=model.eos_token_id,
        torch_dtype=dtype_name, use_sliding_window=False,
    )
    if layout == "native":
        from transformers import InternVLConfig

        text_native = {k: v_ for k, v_ in text.items() if k not in ("rope_theta", "architectures")}
        text_native["rope_parameters"] = {"rope_type": "default", "rope_theta": lm.rope_theta}
        cfg = InternVLConfig(
            vision_config=dict(
                hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                intermediate_size=v.ffn_hidden_size, image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
                use_qk_norm=v.qk_normalization, norm_type="rms_norm", layer_norm_eps=v.norm_eps,
                layer_scale_init_value=v.layer_scale_init, attention_bias=False, use_mean_pooling=True,
                hidden_act="gelu",
            ),
            text_config=text_native, image_token_id=model.image_context_token_id,
            image_seq_length=model.tokens_per_tile, downsample_ratio=model.connector.downsample_ratio,
            projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
            tie_word_embeddings=lm.tie_embeddings,
        )
        out = cfg.to_dict()
        out["architectures"] = ["InternVLForConditionalGeneration"]
        out["torch_dtype"] = dtype_name
        return out
    return dict(
        model_type="internvl_chat", architectures=["InternVLChatModel"], torch_dtype=dtype_name,
        downsample_ratio=model.connector.downsample_ratio, ps_version="v2", select_layer=-1, template="internvl2_5",
        img_context_token_id=model.image_context_token_id,  # remote code sets it from the tokenizer; kept here too
        force_image_size=v.image_size, use_thumbnail=True, dynamic_image_size=True, max_dynamic_patch=12,
        vision_config=dict(
            model_type="intern_vit_6b", architectures=["InternVisionModel"], hidden_size=v.hidden_size,
            num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, intermediate_size=v.ffn_hidden_size,
            image_size=v.image_size, patch_size=v.patch_size, qk_normalization=v.qk_normalization,
            norm_type="rms_norm", layer_norm_eps=v.norm_eps, initializer_factor=v.layer_scale_init, qkv_bias=False,
            hidden_act="gelu", use_flash_attn=False,
        ),
        llm_config=text,
    )


class SafetensorsFile:
    """One .safetensors file read with plain `pread`s: the header once, then each tensor into fresh memory.

    safetensors' own reader memory-maps the file, and every page it touches counts towards the process RSS until the
    handle closes; a converter reading a whole checkpoint through open handles would look as large as the
    checkpoint. Format: u64 little-endian header size, JSON header {name: {dtype, shape, data_offsets}}, data.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            try:
                header = json.loads(fh.read(size))
            except ValueError as exc:
                raise HFFormatError(f"{self.path}: not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        self.header, self._data_start, self._file_size = header, 8 + size, self.path.stat().st_size

    def dtype(self, name: str) -> torch.dtype:
        code = self.header[name]["dtype"]
        if code not in _SAFETENSORS_DTYPES:
            raise HFFormatError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def read(self, name: str) -> torch.Tensor:
        entry, dtype = self.header[name], self.dtype(name)
        begin, end = entry["data_offsets"]
        nbytes = end - begin
        if self._data_start + end > self._file_size or nbytes != math.prod(entry["shape"]) * dtype.itemsize:
            raise HFFormatError(f"{self.path}: tensor {name!r} has inconsistent offsets {entry['data_offsets']}"
                                f" for shape {entry['shape']} {entry['dtype']} (truncated or corrupt file?)")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        with open(self.path, "rb", buffering=0) as fh:
            fh.seek(self._data_start + begin)
            while done < nbytes:  # one read() moves at most ~2 GiB on Linux
                got = fh.readinto(view[done:])
                if not got:
                    raise HFFormatError(f"{self.path}: short read of tensor {name!r}")
                done += got
        return buf.view(dtype).reshape(entry["shape"])


class HFCheckpoint:
    """A read-only HF model directory: config, layout, and tensors read one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        cfg_path = self.path / "config.json"
        if not cfg_path.is_file():
            raise HFFormatError(f"{cfg_path} not found (not an HF model directory)")
        self.config = json.loads(cfg_path.read_text())
        self.layout = detect_layout(self.config, cfg_path)
        stored: dict[str, Path] = {}
        index = self.path / INDEX
        if index.is_file():
            for name, fname in json.loads(index.read_text())["weight_map"].items():
                stored[name] = self.path / fname
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise HFFormatError(f"{self.path}: no *.safetensors files and no {INDEX}")
            for f in files:
                for name in SafetensorsFile(f).header:
                    stored[name] = f
        # canonical name (the mapping table's) -> (file, the name as stored)
        self._where: dict[str, tuple[Path, str]] = {}
        for name, f in stored.items():
            canonical = canonical_name(name, self.layout)
            if canonical in self._where:
                raise HFFormatError(f"{self.path}: tensor {canonical!r} is stored twice, as"
                                    f" {self._where[canonical][1]!r} and {name!r}")
            self._where[canonical] = (f, name)
        self._handles: dict[Path, SafetensorsFile] = {}

    def model_config(self) -> ModelConfig:
        return model_config_from_hf(self.config, self.layout, self.path)

    def names(self) -> list[str]:
        return list(self._where)

    def stored(self, name: str) -> str:
        """The spelling under which the files hold canonical `name` (for messages that name what is on disk)."""
        return self._where[name][1] if name in self._where else stored_name(name, self.layout)

    def _handle(self, f: Path) -> "SafetensorsFile":
        if f not in self._handles:
            if not f.is_file():
                raise HFFormatError(f"{f} is listed in {INDEX} but does not exist")
            self._handles[f] = SafetensorsFile(f)
        return self._handles[f]

    def _entry(self, name: str) -> tuple["SafetensorsFile", str]:
        if name not in self._where:
            disk = stored_name(name, self.layout)
            also = f" (in memory {name!r})" if disk != name else ""
            raise MappingError(f"missing tensor {disk!r}{also} in {self.path}")
        path, stored = self._where[name]
        f = self._handle(path)
        if stored not in f.header:
            raise HFFormatError(f"{f.path} does not hold tensor {stored!r} (the file {INDEX} names)")
        return f, stored

    def get(self, name: str) -> torch.Tensor:
        """One tensor by its canonical name; a missing name raises MappingError naming it and the directory."""
        f, stored = self._entry(name)
        return f.read(stored)

    def meta(self, name: str) -> torch.Tensor:
        """A tensor's shape and dtype as a meta tensor, from the file header (no data read)."""
        f, stored = self._entry(name)
        return torch.empty(f.header[stored]["shape"], dtype=f.dtype(stored), device="meta")

    def dtype(self) -> torch.dtype:
        return self.meta(next(iter(self._where))).dtype

    def asset_files(self) -> list[Path]:
        return [p for p in self.path.iterdir() if p.is_file() and (p.name in ASSET_NAMES or p.suffix in ASSET_SUFFIXES)]


class ShardedSafetensorsWriter:
    """Writes tensors into size-bounded `model-0000i-of-0000N.safetensors` shards plus the HF index file.

    `add` takes the mapping table's (canonical) names; the files carry the names transformers' `save_pretrained`
    writes for `layout` (`stored_name`). `written` lists the canonical names, for manifest checks.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 5 * 2**30, layout: str = "native"):
        self.out, self.max, self.layout = Path(out_dir), max_shard_bytes, layout
        self.out.mkdir(parents=True, exist_ok=True)
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes, self._shards, self._total = 0, [], 0
        self.written: list[str] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.written:
            raise MappingError(f"tensor {name!r} produced twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + nbytes > self.max:
            self._flush()
        self._buf[stored_name(name, self.layout)] = tensor.detach().cpu().contiguous()
        self._buf_bytes += nbytes
        self._total += nbytes
        self.written.append(name)

    def _flush(self) -> None:
        tmp = self.out / f"shard-{len(self._shards):05d}.tmp.safetensors"
        save_file(self._buf, str(tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._buf)))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[Path]:
        """Final names; `model.safetensors` when everything fit into one shard."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            final = self.out / "model.safetensors"
            os.replace(self._shards[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (tmp, names) in enumerate(self._shards):
            final = self.out / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self.out / INDEX).write_text(json.dumps(index, indent=2))
        return finals


def copy_assets(files: list[Path], dst: Path) -> None:
    """Copy tokenizer/processor/template files verbatim."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dst / f.name)
