"""THE declarative HF <-> Megatron parameter table. Conversion (both ways), the vLLM refit, the checkpoint layout
(`bridge/mcore_layout.py`) and the memory model (`scaling/memory.py`) iterate it; no other module spells a
parameter name, shape or TP split. Adding a parameter is one entry here (tests/test_mapping.py checks the table
against the built model).

A rule pairs a Megatron parameter (canonical name: module path with the *global* layer index `{i}`; local-spec
name first, TE-spec alias after) with the HF tensor(s) it corresponds to in each HF layout, plus the layout
transform between the full (TP1) Megatron tensor and the HF tensors, and the parameter's facts: full shape, TP
split, module kind, owning pipeline stage and presence. Rules are in the model's registration order.
Distribution (TP slicing and gathering, PP ownership) is generic and lives in `bridge/shard.py` / `bridge/export.py`.

HF layouts:
- `remote`: InternVL chat / Skywork-R1V remote code (`vision_model.*`, `mlp1.{0,1,3}`, `language_model.model.*`).
- `native`: transformers `InternVLForConditionalGeneration` (`model.vision_tower.*`, `model.multi_modal_projector.*`,
  `model.language_model.*`, `lm_head`), the layout vLLM serves.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from megatron_r1v3.config import ModelConfig, VisionConfig

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
    pad = m.language.padded_vocab_size - t.shape[0]
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
    return _gqa_split(t, m.language.num_kv_heads, m)


def _gqa_split(t: torch.Tensor, groups: int, m: ModelConfig) -> list[torch.Tensor]:
    """Megatron grouped rows of `groups` KV groups (all of them, or one TP shard's) -> HF q, k, v rows."""
    lm = m.language
    ng, d = groups, lm.head_dim
    r = lm.num_heads // lm.num_kv_heads
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


FIRST, DECODER, LAST = "first", "decoder", "last"  # owning pipeline stage (see `Rule.stage`)


def _always(model: ModelConfig, pre_process: bool) -> bool:
    return True


@dataclass(frozen=True)
class Rule:
    """One Megatron parameter: its HF tensors per layout (a layout may need a different transform) and the facts
    the rest of the code derives from it (checkpoint layout, TP split, memory model)."""

    megatron: tuple[str, ...]
    hf: dict[str, tuple[str, ...]]
    shape: Callable[[ModelConfig], tuple[int, ...]]  # full (TP-gathered, padded) Megatron shape
    stage: str  # FIRST (embedding, ViT, connector) | DECODER (layers split by PP) | LAST (final norm, output layer)
    transform: Transform | dict[str, Transform] = DIRECT
    tp_dim: int | None = None  # TP partition dim: 0 column/vocab-parallel, 1 row-parallel, None replicated
    tp_gated: bool = False  # TP shards are [gate_r; up_r], not a contiguous slice of [gate; up]
    linear: bool = False  # of a Column/RowParallelLinear module (local spec): megatron saves its `_extra_state`
    fp8: bool = False  # a GEMM weight that runs in FP8 under Transformer Engine
    present: Callable[[ModelConfig, bool], bool] = _always  # (model, chunk's pre_process) -> the chunk registers it
    # the serving engine (vLLM) splits these HF tensors over its TP ranks as Megatron splits the parameter: TP shard
    # r converts to slice r of each HF tensor (`shard_to_hf`); False where vLLM replicates the module (connector) or
    # pads heads its own way (InternViT)
    serve_split: bool = False

    def transform_for(self, layout: str) -> Transform:
        return self.transform[layout] if isinstance(self.transform, dict) else self.transform

    @property
    def layer_space(self) -> str | None:
        """Which layer index `{i}` counts: 'decoder', 'vision' or None."""
        if "{i}" not in self.megatron[0]:
            return None
        return "decoder" if self.stage == DECODER else "vision"


_LM = {"remote": "language_model.model.", "native": "model.language_model."}
_VIT = {"remote": "vision_model.", "native": "model.vision_tower."}


def _lm(*suffixes: str) -> dict[str, tuple[str, ...]]:
    return {lay: tuple(_LM[lay] + s for s in suffixes) for lay in LAYOUTS}


def _vit(remote: Sequence[str], native: Sequence[str]) -> dict[str, tuple[str, ...]]:
    return {"remote": tuple(_VIT["remote"] + s for s in remote), "native": tuple(_VIT["native"] + s for s in native)}


# --- shapes (full Megatron tensors: padded vocab, padded ViT heads)
def _lm_vec(m: ModelConfig) -> tuple[int, ...]:
    return (m.language.hidden_size,)


def _vit_vec(m: ModelConfig) -> tuple[int, ...]:
    return (m.vision.hidden_size,)


def _vocab(m: ModelConfig) -> tuple[int, ...]:
    return (m.language.padded_vocab_size, m.language.hidden_size)


def _qkv_rows(m: ModelConfig) -> int:
    lm = m.language
    return (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim


def _vit_width(m: ModelConfig) -> int:
    return m.vision.padded_heads * m.vision.head_dim


def _connector_in(m: ModelConfig) -> int:
    return m.vision.hidden_size * int(round(1 / m.connector.downsample_ratio)) ** 2


# --- presence
def _has_qk_norm(m: ModelConfig, pre_process: bool) -> bool:
    return m.vision.qk_normalization


def _has_output_layer(m: ModelConfig, pre_process: bool) -> bool:
    """Tied embeddings: a chunk holding the embedding reuses it; a later last stage keeps a copy (megatron)."""
    return not (m.language.tie_embeddings and pre_process)


_COL = {"tp_dim": 0, "linear": True}  # ColumnParallelLinear weight / bias
_ROW = {"tp_dim": 1, "linear": True}  # RowParallelLinear weight (its bias is replicated: linear=True only)
_COL_S, _ROW_S = {**_COL, "serve_split": True}, {**_ROW, "serve_split": True}  # the decoder's: vLLM splits alike
_D = "language_model.decoder.layers.{i}."
_V = "vision_model.encoder.layers.{i}."
_VH_R, _VH_N = "encoder.layers.{i}.", "encoder.layer.{i}."
_CONN_NATIVE = "model.multi_modal_projector."

RULES: tuple[Rule, ...] = (
    # --- decoder (Qwen2.5) ---
    Rule(("language_model.embedding.word_embeddings.weight",), _lm("embed_tokens.weight"), _vocab, FIRST, VOCAB,
         tp_dim=0, serve_split=True),
    Rule((_D + "input_layernorm.weight", _D + "self_attention.linear_qkv.layer_norm_weight"),
         _lm("layers.{i}.input_layernorm.weight"), _lm_vec, DECODER),
    Rule((_D + "self_attention.linear_proj.weight",), _lm("layers.{i}.self_attn.o_proj.weight"),
         lambda m: (m.language.hidden_size, m.language.num_heads * m.language.head_dim), DECODER, **_ROW_S, fp8=True),
    Rule((_D + "self_attention.linear_qkv.weight",),
         _lm(*(f"layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv")),
         lambda m: (_qkv_rows(m), m.language.hidden_size), DECODER, QKV_GQA, **_COL_S, fp8=True),
    Rule((_D + "self_attention.linear_qkv.bias",), _lm(*(f"layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv")),
         lambda m: (_qkv_rows(m),), DECODER, QKV_GQA, **_COL_S),
    Rule((_D + "pre_mlp_layernorm.weight", _D + "mlp.linear_fc1.layer_norm_weight"),
         _lm("layers.{i}.post_attention_layernorm.weight"), _lm_vec, DECODER),
    Rule((_D + "mlp.linear_fc1.weight",), _lm("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight"),
         lambda m: (2 * m.language.ffn_hidden_size, m.language.hidden_size), DECODER, GATE_UP, **_COL_S,
         tp_gated=True, fp8=True),
    Rule((_D + "mlp.linear_fc2.weight",), _lm("layers.{i}.mlp.down_proj.weight"),
         lambda m: (m.language.hidden_size, m.language.ffn_hidden_size), DECODER, **_ROW_S, fp8=True),
    Rule(("language_model.decoder.final_layernorm.weight",), _lm("norm.weight"), _lm_vec, LAST),
    Rule(("language_model.output_layer.weight",),
         {"remote": ("language_model.lm_head.weight",), "native": ("lm_head.weight",)}, _vocab, LAST, VOCAB,
         tp_dim=0, linear=True, present=_has_output_layer, serve_split=True),
    # --- vision (InternViT) ---
    Rule(("vision_model.embeddings.class_embedding",),
         _vit(["embeddings.class_embedding"], ["embeddings.cls_token"]), lambda m: (1, 1, m.vision.hidden_size), FIRST),
    Rule(("vision_model.embeddings.position_embedding",),
         _vit(["embeddings.position_embedding"], ["embeddings.position_embeddings"]),
         lambda m: (1, m.vision.grid ** 2 + 1, m.vision.hidden_size), FIRST),
    Rule(("vision_model.embeddings.patch_embedding.weight",),
         _vit(["embeddings.patch_embedding.weight"], ["embeddings.patch_embeddings.projection.weight"]),
         lambda m: (m.vision.hidden_size, 3, m.vision.patch_size, m.vision.patch_size), FIRST),
    Rule(("vision_model.embeddings.patch_embedding.bias",),
         _vit(["embeddings.patch_embedding.bias"], ["embeddings.patch_embeddings.projection.bias"]), _vit_vec, FIRST),
    Rule((_V + "ls1",), _vit([_VH_R + "ls1"], [_VH_N + "lambda_1"]), _vit_vec, FIRST),
    Rule((_V + "ls2",), _vit([_VH_R + "ls2"], [_VH_N + "lambda_2"]), _vit_vec, FIRST),
    Rule((_V + "norm1.weight",), _vit([_VH_R + "norm1.weight"], [_VH_N + "layernorm_before.weight"]), _vit_vec, FIRST),
    Rule((_V + "attn.qkv.weight",),
         _vit([_VH_R + "attn.qkv.weight"], [_VH_N + f"attention.{p}_proj.weight" for p in "qkv"]),
         lambda m: (3 * _vit_width(m), m.vision.hidden_size), FIRST,
         {"remote": VIT_QKV_FUSED, "native": VIT_QKV_SPLIT}, **_COL),
    Rule((_V + "attn.q_norm.weight",), _vit([_VH_R + "attn.q_norm.weight"], [_VH_N + "attention.q_norm.weight"]),
         lambda m: (_vit_width(m),), FIRST, VIT_NORM, tp_dim=0, present=_has_qk_norm),
    Rule((_V + "attn.k_norm.weight",), _vit([_VH_R + "attn.k_norm.weight"], [_VH_N + "attention.k_norm.weight"]),
         lambda m: (_vit_width(m),), FIRST, VIT_NORM, tp_dim=0, present=_has_qk_norm),
    Rule((_V + "attn.proj.weight",),
         _vit([_VH_R + "attn.proj.weight"], [_VH_N + "attention.projection_layer.weight"]),
         lambda m: (m.vision.hidden_size, _vit_width(m)), FIRST, VIT_PROJ, **_ROW),
    Rule((_V + "attn.proj.bias",), _vit([_VH_R + "attn.proj.bias"], [_VH_N + "attention.projection_layer.bias"]),
         _vit_vec, FIRST, linear=True),
    Rule((_V + "norm2.weight",), _vit([_VH_R + "norm2.weight"], [_VH_N + "layernorm_after.weight"]), _vit_vec, FIRST),
    Rule((_V + "mlp.fc1.weight",), _vit([_VH_R + "mlp.fc1.weight"], [_VH_N + "mlp.fc1.weight"]),
         lambda m: (m.vision.ffn_hidden_size, m.vision.hidden_size), FIRST, **_COL),
    Rule((_V + "mlp.fc1.bias",), _vit([_VH_R + "mlp.fc1.bias"], [_VH_N + "mlp.fc1.bias"]),
         lambda m: (m.vision.ffn_hidden_size,), FIRST, **_COL),
    Rule((_V + "mlp.fc2.weight",), _vit([_VH_R + "mlp.fc2.weight"], [_VH_N + "mlp.fc2.weight"]),
         lambda m: (m.vision.hidden_size, m.vision.ffn_hidden_size), FIRST, **_ROW),
    Rule((_V + "mlp.fc2.bias",), _vit([_VH_R + "mlp.fc2.bias"], [_VH_N + "mlp.fc2.bias"]), _vit_vec, FIRST,
         linear=True),
    # --- connector (mlp1) ---
    # local LayerNorm name, then the TE name (norm fused into linear_fc1), which is the checkpoint key of both specs
    Rule(("mlp1.layer_norm.weight", "mlp1.linear_fc1.layer_norm_weight"),
         {"remote": ("mlp1.0.weight",), "native": (_CONN_NATIVE + "layer_norm.weight",)},
         lambda m: (_connector_in(m),), FIRST),
    Rule(("mlp1.layer_norm.bias", "mlp1.linear_fc1.layer_norm_bias"),
         {"remote": ("mlp1.0.bias",), "native": (_CONN_NATIVE + "layer_norm.bias",)},
         lambda m: (_connector_in(m),), FIRST),
    Rule(("mlp1.linear_fc1.weight",), {"remote": ("mlp1.1.weight",), "native": (_CONN_NATIVE + "linear_1.weight",)},
         lambda m: (m.language.hidden_size, _connector_in(m)), FIRST, **_COL, fp8=True),
    Rule(("mlp1.linear_fc1.bias",), {"remote": ("mlp1.1.bias",), "native": (_CONN_NATIVE + "linear_1.bias",)},
         _lm_vec, FIRST, **_COL),
    Rule(("mlp1.linear_fc2.weight",), {"remote": ("mlp1.3.weight",), "native": (_CONN_NATIVE + "linear_2.weight",)},
         lambda m: (m.language.hidden_size, m.language.hidden_size), FIRST, **_ROW, fp8=True),
    Rule(("mlp1.linear_fc2.bias",), {"remote": ("mlp1.3.bias",), "native": (_CONN_NATIVE + "linear_2.bias",)},
         _lm_vec, FIRST, linear=True),
)

# Module path of the decoder layers (`....layers.`): `bridge/shard.py` renumbers the layer index that follows it.
DECODER_LAYER_PREFIX = next(r.megatron[0] for r in RULES if r.stage == DECODER).split("{i}")[0]



def parameter_names(component: str) -> list[str]:
    """Canonical names (`{i}` for the layer) of one top-level module's parameters: `language_model`, `vision_model`
    or `mlp1` (the connector)."""
    return [r.megatron[0] for r in RULES if r.megatron[0].split(".", 1)[0] == component]

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


@dataclass(frozen=True)
class ShardPiece:
    """Part of a full HF tensor: `piece` is its slice [offset, offset + piece.shape[dim]) along `dim`."""

    name: str
    piece: torch.Tensor
    full_shape: tuple[int, ...]
    dim: int
    offset: int


def shard_to_hf(megatron_name: str, shard: torch.Tensor, model: ModelConfig, layout: str, tp_rank: int,
                tp: int) -> list[ShardPiece]:
    """TP shard `tp_rank` of `tp` of a `serve_split` Megatron tensor -> its slice of each HF tensor: what TP rank
    `tp_rank` of a serving engine at the same TP size loads (q/k/v rows of its KV groups, gate/up rows, o/down
    columns, vocab rows; padded vocab rows past `vocab_size` dropped)."""
    rule, layer = find_rule(megatron_name)
    if not rule.serve_split:
        raise MappingError(f"{megatron_name!r}: the serving engine does not split it as Megatron does")
    names, dim, transform = hf_names(rule, layer, layout), rule.tp_dim, rule.transform_for(layout)
    if transform is VOCAB:
        rows, vocab = shard.shape[0], model.language.vocab_size
        start = tp_rank * rows
        piece = shard[: max(0, min(rows, vocab - start))]
        return [ShardPiece(names[0], piece, (vocab, *shard.shape[1:]), 0, start)]
    if transform is QKV_GQA:
        pieces = _gqa_split(shard, model.language.num_kv_heads // tp, model)
    elif transform is GATE_UP:
        pieces = list(shard.chunk(2, dim=0))
    elif transform is DIRECT:
        pieces = [shard]
    else:
        raise MappingError(f"{megatron_name!r}: no shard conversion for transform {transform.name!r}")
    out = []
    for name, piece in zip(names, pieces):
        full = list(piece.shape)
        full[dim] *= tp
        out.append(ShardPiece(name, piece, tuple(full), dim, tp_rank * piece.shape[dim]))
    return out


def to_megatron(
    megatron_name: str, read_hf: Callable[[str], torch.Tensor], model: ModelConfig, layout: str
) -> tuple[torch.Tensor, list[str]]:
    """Build the full Megatron tensor from the HF tensors it needs; returns it and the HF names consumed."""
    rule, layer = find_rule(megatron_name)
    names = hf_names(rule, layer, layout)
    return rule.transform_for(layout).to_megatron([read_hf(n) for n in names], model), names


def megatron_parameters(
    model: ModelConfig, pre_process: bool = True, post_process: bool = True, decoder_layers: Sequence[int] | None = None
) -> Iterator[tuple[Rule, int | None, str]]:
    """(rule, layer, canonical name) of every Megatron parameter in the model's registration order (layer by layer).
    Whole model by default; one pipeline chunk with the arguments: FIRST-stage rules need `pre_process`, LAST-stage
    ones `post_process`, and `decoder_layers` are the chunk's global decoder layer numbers."""
    owned = {FIRST: pre_process, DECODER: True, LAST: post_process}
    layers = {"decoder": range(model.language.num_layers) if decoder_layers is None else decoder_layers,
              "vision": range(model.vision.num_layers), None: [None]}
    for space, group in itertools.groupby(RULES, key=lambda r: r.layer_space):
        rules = [r for r in group if owned[r.stage] and r.present(model, pre_process)]
        for layer in layers[space]:
            for rule in rules:
                yield rule, layer, rule.megatron[0].replace("{i}", str(layer))


def expected_hf_names(model: ModelConfig, layout: str) -> Iterator[str]:
    """Every HF tensor name a checkpoint of this model must hold, in model order (the conversion/refit manifest)."""
    for rule, layer, _ in megatron_parameters(model):
        yield from hf_names(rule, layer, layout)


def convert_layout(
    read_hf: Callable[[str], torch.Tensor], model: ModelConfig, src: str, dst: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """Re-express a checkpoint in another HF layout through the Megatron form (e.g. remote -> native)."""
    for rule, layer, _ in megatron_parameters(model):
        full = rule.transform_for(src).to_megatron([read_hf(n) for n in hf_names(rule, layer, src)], model)
        yield from zip(hf_names(rule, layer, dst), rule.transform_for(dst).to_hf(full, model))
