"""THE declarative HF <-> Megatron mapping. Conversion (both ways) and the vLLM refit iterate this table; no other
module spells a parameter name.

A rule pairs a Megatron parameter (canonical name: module path with the *global* layer index `{i}`; local-spec
name first, TE-spec alias after) with the HF tensor(s) it corresponds to in each HF layout, plus the layout
transform between the full (TP1) Megatron tensor and the HF tensors. Distribution (TP slicing and gathering, PP
ownership) is generic and lives in `bridge/shard.py` / `bridge/export.py`.

HF layouts:
- `remote`: InternVL chat / Skywork-R1V remote code (`vision_model.*`, `mlp1.{0,1,3}`, `language_model.model.*`).
- `native`: transformers `InternVLForConditionalGeneration` (`model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head`), the layout vLLM serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from megatron_r1v3.config import ModelConfig, VisionConfig, padded_vocab_size

LAYOUTS = ("remote", "native")


class MappingError(KeyError):
    """A name no rule covers, or tensors that do not fit the rule; the message names the tensor."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Transform:
    """full Megatron tensor <-> list of HF tensors (same order as the rule's HF names)."""

    name: str
    to_megatron: Callable[[list[torch.Tensor], ModelConfig], torch.Tensor]
    to_hf: Callable[[torch.Tensor, ModelConfig], list[torch.Tensor]]


def _direct() -> Transform:
    return Transform("direct", lambda ts, m: ts[0], lambda t, m: [t])


def _vocab_to_megatron(ts, m):
    t = ts[0]
    pad = padded_vocab_size(m.language.vocab_size, m.language.make_vocab_size_divisible_by, 1) - t.shape[0]
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad > 0 else t


def _gqa_to_megatron(ts, m):
    """HF q, k, v -> Megatron grouped [per KV group: q (r*d), k (d), v (d)] rows."""
    q, k, v = ts
    lm = m.language
    ng, d = lm.num_kv_heads, lm.head_dim
    r = lm.num_heads // ng
    tail = q.shape[1:]
    out = torch.cat([q.reshape(ng, r * d, *tail), k.reshape(ng, d, *tail), v.reshape(ng, d, *tail)], dim=1)
    return out.reshape(-1, *tail)


def _gqa_to_hf(t, m):
    lm = m.language
    ng, d = lm.num_kv_heads, lm.head_dim
    r = lm.num_heads // ng
    tail = t.shape[1:]
    g = t.reshape(ng, (r + 2) * d, *tail)
    q, k, v = g[:, : r * d], g[:, r * d : (r + 1) * d], g[:, (r + 1) * d :]
    return [x.reshape(-1, *tail).contiguous() for x in (q, k, v)]


def pad_heads(tensor: torch.Tensor, kind: str, vcfg: VisionConfig, padded_heads: int) -> torch.Tensor:
    """Full (unsharded) real-head tensor -> zero-padded to `padded_heads`. kind: qkv | norm | proj."""
    extra, d = padded_heads - vcfg.num_heads, vcfg.head_dim
    if extra == 0:
        return tensor
    if kind == "qkv":  # megatron layout [heads, 3, d, H]
        t = tensor.view(vcfg.num_heads, 3 * d, -1)
        return torch.cat([t, t.new_zeros(extra, 3 * d, t.shape[-1])]).reshape(-1, t.shape[-1])
    if kind == "norm":
        return torch.cat([tensor, tensor.new_zeros(extra * d)])
    if kind == "proj":
        return torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra * d)], dim=1)
    raise ValueError(f"unknown ViT head-padding kind {kind!r}")


def strip_heads(tensor: torch.Tensor, kind: str, vcfg: VisionConfig) -> torch.Tensor:
    """Inverse of `pad_heads`: keep the real heads only (exports are always unpadded)."""
    real, d = vcfg.num_heads, vcfg.head_dim
    if kind == "qkv":
        return tensor.view(-1, 3 * d, tensor.shape[-1])[:real].reshape(-1, tensor.shape[-1])
    if kind == "norm":
        return tensor[: real * d]
    if kind == "proj":
        return tensor[:, : real * d]
    raise ValueError(f"unknown ViT head-padding kind {kind!r}")


def _vit_fused_to_megatron(ts, m):
    """Remote fused qkv `[all q; all k; all v]` -> per head `[q_h; k_h; v_h]`, zero-padded heads."""
    v = m.vision
    t = ts[0]
    per_head = t.reshape(3, v.num_heads, v.head_dim, -1).transpose(0, 1).reshape(-1, t.shape[-1])
    return pad_heads(per_head, "qkv", v, v.padded_heads)


def _vit_fused_to_hf(t, m):
    v = m.vision
    real = strip_heads(t, "qkv", v)
    return [real.reshape(v.num_heads, 3, v.head_dim, -1).transpose(0, 1).reshape(-1, t.shape[-1]).contiguous()]


def _vit_split_to_megatron(ts, m):
    return _vit_fused_to_megatron([torch.cat(ts, dim=0)], m)


def _vit_split_to_hf(t, m):
    return list(_vit_fused_to_hf(t, m)[0].chunk(3, dim=0))


def _vit_pad(kind: str) -> Transform:
    return Transform(
        f"vit_{kind}",
        lambda ts, m: pad_heads(ts[0], kind, m.vision, m.vision.padded_heads),
        lambda t, m: [strip_heads(t, kind, m.vision).contiguous()],
    )


DIRECT = _direct()
VOCAB = Transform("vocab", _vocab_to_megatron, lambda t, m: [t[: m.language.vocab_size].contiguous()])
QKV_GQA = Transform("qkv_gqa", _gqa_to_megatron, _gqa_to_hf)
GATE_UP = Transform("gate_up", lambda ts, m: torch.cat(ts, dim=0), lambda t, m: list(t.chunk(2, dim=0)))
VIT_QKV_FUSED = Transform("vit_qkv_fused", _vit_fused_to_megatron, _vit_fused_to_hf)
VIT_QKV_SPLIT = Transform("vit_qkv_split", _vit_split_to_megatron, _vit_split_to_hf)
VIT_NORM, VIT_PROJ = _vit_pad("norm"), _vit_pad("proj")


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter <-> its HF tensors, per layout (a layout may need a different transform)."""

    megatron: tuple[str, ...]
    hf: dict[str, tuple[str, ...]]
    transform: Transform | dict[str, Transform] = DIRECT
    tp_gated: bool = False  # TP shards are [gate_r; up_r], not a contiguous slice of [gate; up]

    def transform_for(self, layout: str) -> Transform:
        return self.transform[layout] if isinstance(self.transform, dict) else self.transform

    @property
    def layer_space(self) -> str | None:
        """Which layer index `{i}` counts: 'decoder', 'vision' or None."""
        name = self.megatron[0]
        if "{i}" not in name:
            return None
        return "decoder" if name.startswith("language_model.") else "vision"


def _both(name: str) -> dict[str, tuple[str, ...]]:
    return {"remote": (name,), "native": (name,)}


_LM = {"remote": "language_model.model.", "native": "model.language_model."}
_VIT = {"remote": "vision_model.", "native": "model.vision_tower."}


def _lm(*suffixes: str) -> dict[str, tuple[str, ...]]:
    return {lay: tuple(_LM[lay] + s for s in suffixes) for lay in LAYOUTS}


def _vit(remote: Sequence[str], native: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"remote": tuple(_VIT["remote"] + s for s in remote), "native": tuple(_VIT["native"] + s for s in native)}


_D = "language_model.decoder.layers.{i}."
_V = "vision_model.encoder.layers.{i}."
_VH_R, _VH_N = "encoder.layers.{i}.", "encoder.layer.{i}."
_CONN_NATIVE = "model.multi_modal_projector."

RULES: tuple[Rule, ...] = (
    # --- decoder (Qwen2.5) ---
    Rule(("language_model.embedding.word_embeddings.weight",), _lm("embed_tokens.weight"), VOCAB),
    Rule(("language_model.output_layer.weight",),
         {"remote": ("language_model.lm_head.weight",), "native": ("lm_head.weight",)}, VOCAB),
    Rule(("language_model.decoder.final_layernorm.weight",), _lm("norm.weight")),
    Rule((_D + "input_layernorm.weight", _D + "self_attention.linear_qkv.layer_norm_weight"),
         _lm("layers.{i}.input_layernorm.weight")),
    Rule((_D + "self_attention.linear_qkv.weight",),
         _lm(*(f"layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv")), QKV_GQA),
    Rule((_D + "self_attention.linear_qkv.bias",),
         _lm(*(f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv")), QKV_GQA),
    Rule((_D + "self_attention.linear_proj.weight",), _lm("layers.{i}.self_attn.o_proj.weight")),
    Rule((_D + "pre_mlp_layernorm.weight", _D + "mlp.linear_fc1.layer_norm_weight"),
         _lm("layers.{i}.post_attention_layernorm.weight")),
    Rule((_D + "mlp.linear_fc1.weight",), _lm("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
         GATE_UP, tp_gated=True),
    Rule((_D + "mlp.linear_fc2.weight",), _lm("layers.{i}.mlp.down_proj.weight")),
    # --- vision (InternViT) ---
    Rule(("vision_model.embeddings.class_embedding",),
         _vit(["embeddings.class_embedding"], ["embeddings.cls_token"])),
    Rule(("vision_model.embeddings.patch_embedding.weight",),
         _vit(["embeddings.patch_embedding.weight"], ["embeddings.patch_embeddings.projection.weight"])),
    Rule(("vision_model.embeddings.patch_embedding.bias",),
         _vit(["embeddings.patch_embedding.bias"], ["embeddings.patch_embeddings.projection.bias"])),
    Rule(("vision_model.embeddings.position_embedding",),
         _vit(["embeddings.position_embedding"], ["embeddings.position_embeddings"])),
    Rule((_V + "norm1.weight",), _vit([_VH_R + "norm1.weight"], [_VH_N + "layernorm_before.weight"])),
    Rule((_V + "norm2.weight",), _vit([_VH_R + "norm2.weight"], [_VH_N + "layernorm_after.weight"])),
    Rule((_V + "ls1",), _vit([_VH_R + "ls1"], [_VH_N + "lambda_1"])),
    Rule((_V + "ls2",), _vit([_VH_R + "ls2"], [_VH_N + "lambda_2"])),
    Rule((_V + "attn.qkv.weight",),
         _vit([_VH_R + "attn.qkv.weight"], [_VH_N + f"attention.{p}_proj.weight" for p in "qkv"]),
         {"remote": VIT_QKV_FUSED, "native": VIT_QKV_SPLIT}),
    Rule((_V + "attn.q_norm.weight",), _vit([_VH_R + "attn.q_norm.weight"], [_VH_N + "attention.q_norm.weight"]),
         VIT_NORM),
    Rule((_V + "attn.k_norm.weight",), _vit([_VH_R + "attn.k_norm.weight"], [_VH_N + "attention.k_norm.weight"]),
         VIT_NORM),
    Rule((_V + "attn.proj.weight",),
         _vit([_VH_R + "attn.proj.weight"], [_VH_N + "attention.projection_layer.weight"]), VIT_PROJ),
    Rule((_V + "attn.proj.bias",), _vit([_VH_R + "attn.proj.bias"], [_VH_N + "attention.projection_layer.bias"])),
    *(Rule((_V + f"mlp.{p}",), _vit([_VH_R + f"mlp.{p}"], [_VH_N + f"mlp.{p}"]))
      for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
    # --- connector (mlp1) ---
    Rule(("mlp1.layer_norm.weight", "mlp1.linear_fc1.layer_norm_weight"),
         {"remote": ("mlp1.0.weight",), "native": (_CONN_NATIVE + "layer_norm.weight",)}),
    Rule(("mlp1.layer_norm.bias", "mlp1.linear_fc1.layer_norm_bias"),
         {"remote": ("mlp1.0.bias",), "native": (_CONN_NATIVE + "layer_norm.bias",)}),
    *(Rule((f"mlp1.linear_fc{n}.{p}",), {"remote": (f"mlp1.{r}.{p}",), "native": (_CONN_NATIVE + f"linear_{n}.{p}",)})
      for n, r in ((1, 1), (2, 3)) for p in ("weight", "bias")),
)


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_MEGATRON_INDEX = [(_compile(name), rule) for rule in RULES for name in rule.megatron]


def find_rule(megatron_name: str) -> tuple[Rule, int | None]:
    """The rule for a canonical Megatron name and its layer index (None for non-layer tensors)."""
    for pattern, rule in _MEGATRON_INDEX:
        m = pattern.match(megatron_name)
        if m:
            return rule, int(m.group(1)) if m.groups() else None
    raise MappingError(f"no mapping rule for Megatron parameter {megatron_name!r}")


def hf_names(rule: Rule, layer: int | None, layout: str) -> list[str]:
    """Concrete HF tensor names of a rule in a layout."""
    if layout not in LAYOUTS:
        raise MappingError(f"unknown HF layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return [n.replace("{i}", str(layer)) if layer is not None else n for n in rule.hf[layout]]


def to_hf(megatron_name: str, full: torch.Tensor, model: ModelConfig, layout: str) -> list[tuple[str, torch.Tensor]]:
    """A full (TP-gathered) Megatron tensor -> [(hf_name, tensor), ...]."""
    rule, layer = find_rule(megatron_name)
    return list(zip(hf_names(rule, layer, layout), rule.transform_for(layout).to_hf(full, model)))


def to_megatron(
    megatron_name: str, read_hf: Callable[[str], torch.Tensor], model: ModelConfig, layout: str
) -> tuple[torch.Tensor, list[str]]:
    """Build the full Megatron tensor from the HF tensors it needs; returns it and the HF names consumed."""
    rule, layer = find_rule(megatron_name)
    names = hf_names(rule, layer, layout)
    return rule.transform_for(layout).to_megatron([read_hf(n) for n in names], model), names


def layer_count(space: str, model: ModelConfig) -> int:
    return model.language.num_layers if space == "decoder" else model.vision.num_layers


def megatron_parameters(model: ModelConfig) -> Iterator[tuple[Rule, int | None, str]]:
    """(rule, layer, canonical name) of every Megatron parameter of this model, in table order."""
    for rule in RULES:
        if rule.megatron[0] == "language_model.output_layer.weight" and model.language.tie_embeddings:
            continue
        if "q_norm" in rule.megatron[0] or "k_norm" in rule.megatron[0]:
            if not model.vision.qk_normalization:
                continue
        space = rule.layer_space
        for layer in range(layer_count(space, model)) if space else [None]:
            yield rule, layer, rule.megatron[0].replace("{i}", str(layer))


def expected_hf_names(model: ModelConfig, layout: str) -> Iterator[str]:
    """Every HF tensor name a checkpoint of this model must hold, in table order (the conversion/refit manifest)."""
    for rule, layer, _ in megatron_parameters(model):
        yield from hf_names(rule, layer, layout)


def convert_layout(
    read_hf: Callable[[str], torch.Tensor], model: ModelConfig, src: str, dst: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Re-express a checkpoint in another HF layout through the Megatron form (e.g. remote -> native)."""
    for rule in RULES:
        space = rule.layer_space
        for layer in range(layer_count(space, model)) if space else [None]:
            names = hf_names(rule, layer, src)
            try:
                tensors = [read_hf(n) for n in names]
            except MappingError:
                if rule.megatron[0] == "language_model.output_layer.weight" and model.language.tie_embeddings:
                    continue
                raise
            full = rule.transform_for(src).to_megatron(tensors, model)
            yield from zip(hf_names(rule, layer, dst), rule.transform_for(dst).to_hf(full, model))
