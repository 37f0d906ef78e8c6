"""What megatron-core's `torch_dist` checkpoint of our model holds, computed from the model config alone.

For every parameter of the mapping table: its sharded key, global shape and the chunk one process writes; plus the
`_extra_state` objects of the linear layers. No model is built and megatron is not imported, so conversion starts
in a second. Global shapes do not depend on TP/PP (the vocab and the ViT heads are padded by config, not by TP),
so a checkpoint written from one process loads at every layout; TP only has to divide the padded sizes.

megatron-core's conventions reproduced here (tests/test_conversion.py compares them with the real model's
`sharded_state_dict()` at TP2·PP2):
- decoder layers are stacked: key without the layer index, a leading axis of `num_layers`, one chunk per layer;
  the decoder's layer norms use the Transformer Engine names (local and TE specs write the same keys);
- ViT and connector keys are the module paths (ViT layers keep their index);
- every Column/RowParallelLinear has an `_extra_state` object (`None` for local layers), key
  `<module>._extra_state/shard_<offset>_<shape>` over the stacked-layer axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

from megatron_r1v3.bridge.mapping import Rule, megatron_parameters
from megatron_r1v3.config import ModelConfig, padded_vocab_size

_D, _V = "language_model.decoder.layers.{i}.", "vision_model.encoder.layers.{i}."


def padded_vocab(model: ModelConfig, tp: int = 1) -> int:
    return padded_vocab_size(model.language.vocab_size, model.language.make_vocab_size_divisible_by, tp)


def _qkv_rows(m: ModelConfig) -> int:
    lm = m.language
    return (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim


def _vit_width(m: ModelConfig) -> int:
    return m.vision.padded_heads * m.vision.head_dim


def _connector_in(m: ModelConfig) -> int:
    return m.vision.hidden_size * int(round(1 / m.connector.downsample_ratio)) ** 2


# Full (TP-gathered, padded) shape of every parameter, by the mapping table's canonical name.
_SHAPES: dict[str, Callable[[ModelConfig], tuple[int, ...]]] = {
    "language_model.embedding.word_embeddings.weight": lambda m: (padded_vocab(m), m.language.hidden_size),
    "language_model.output_layer.weight": lambda m: (padded_vocab(m), m.language.hidden_size),
    "language_model.decoder.final_layernorm.weight": lambda m: (m.language.hidden_size,),
    _D + "input_layernorm.weight": lambda m: (m.language.hidden_size,),
    _D + "self_attention.linear_qkv.weight": lambda m: (_qkv_rows(m), m.language.hidden_size),
    _D + "self_attention.linear_qkv.bias": lambda m: (_qkv_rows(m),),
    _D + "self_attention.linear_proj.weight":
        lambda m: (m.language.hidden_size, m.language.num_heads * m.language.head_dim),
    _D + "pre_mlp_layernorm.weight": lambda m: (m.language.hidden_size,),
    _D + "mlp.linear_fc1.weight": lambda m: (2 * m.language.ffn_hidden_size, m.language.hidden_size),
    _D + "mlp.linear_fc2.weight": lambda m: (m.language.hidden_size, m.language.ffn_hidden_size),
    "vision_model.embeddings.class_embedding": lambda m: (1, 1, m.vision.hidden_size),
    "vision_model.embeddings.patch_embedding.weight":
        lambda m: (m.vision.hidden_size, 3, m.vision.patch_size, m.vision.patch_size),
    "vision_model.embeddings.patch_embedding.bias": lambda m: (m.vision.hidden_size,),
    "vision_model.embeddings.position_embedding": lambda m: (1, m.vision.grid ** 2 + 1, m.vision.hidden_size),
    _V + "norm1.weight": lambda m: (m.vision.hidden_size,),
    _V + "norm2.weight": lambda m: (m.vision.hidden_size,),
    _V + "ls1": lambda m: (m.vision.hidden_size,),
    _V + "ls2": lambda m: (m.vision.hidden_size,),
    _V + "attn.qkv.weight": lambda m: (3 * _vit_width(m), m.vision.hidden_size),
    _V + "attn.q_norm.weight": lambda m: (_vit_width(m),),
    _V + "attn.k_norm.weight": lambda m: (_vit_width(m),),
    _V + "attn.proj.weight": lambda m: (m.vision.hidden_size, _vit_width(m)),
    _V + "attn.proj.bias": lambda m: (m.vision.hidden_size,),
    _V + "mlp.fc1.weight": lambda m: (m.vision.ffn_hidden_size, m.vision.hidden_size),
    _V + "mlp.fc1.bias": lambda m: (m.vision.ffn_hidden_size,),
    _V + "mlp.fc2.weight": lambda m: (m.vision.hidden_size, m.vision.ffn_hidden_size),
    _V + "mlp.fc2.bias": lambda m: (m.vision.hidden_size,),
    "mlp1.layer_norm.weight": lambda m: (_connector_in(m),),
    "mlp1.layer_norm.bias": lambda m: (_connector_in(m),),
    "mlp1.linear_fc1.weight": lambda m: (m.language.hidden_size, _connector_in(m)),
    "mlp1.linear_fc1.bias": lambda m: (m.language.hidden_size,),
    "mlp1.linear_fc2.weight": lambda m: (m.language.hidden_size, m.language.hidden_size),
    "mlp1.linear_fc2.bias": lambda m: (m.language.hidden_size,),
}

# Modules that are Column/RowParallelLinear (they carry `_extra_state`), by their canonical module path.
_LINEARS = (
    _D + "self_attention.linear_qkv", _D + "self_attention.linear_proj", _D + "mlp.linear_fc1", _D + "mlp.linear_fc2",
    _V + "attn.qkv", _V + "attn.proj", _V + "mlp.fc1", _V + "mlp.fc2", "mlp1.linear_fc1", "mlp1.linear_fc2",
)


@dataclass(frozen=True)
class Chunk:
    """One parameter as written: `name` (canonical, the mapping's key) -> region `offset`+`sizes` of tensor `key`."""

    name: str
    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]  # the full Megatron tensor (sizes without the stacked-layer axis)


def _stacked(template: str, layer: int | None, model: ModelConfig) -> tuple[str, tuple[int, ...], int]:
    """(key template with `{i}` removed or filled, prefix offset, stacked size); prefix empty when not stacked."""
    if template.startswith(_D):
        return template.replace("layers.{i}.", "layers."), (layer,), model.language.num_layers
    return template.replace("{i}", str(layer)), (), 0


def megatron_shape(template: str, model: ModelConfig) -> tuple[int, ...]:
    return _SHAPES[template](model)


def _key(rule: Rule) -> str:
    # decoder layer norms: megatron's local spec maps them to the TE names (sharded_state_dict_keys_map)
    return rule.megatron[-1] if rule.layer_space == "decoder" else rule.megatron[0]


def chunks(model: ModelConfig) -> Iterator[Chunk]:
    """Every parameter of the model as one chunk (a whole layer of a stacked tensor, or the whole tensor)."""
    for rule, layer, name in megatron_parameters(model):
        shape = megatron_shape(rule.megatron[0], model)
        key, prefix, stacked = _stacked(_key(rule), layer, model)
        if prefix:
            yield Chunk(name, key, (stacked, *shape), (*prefix, *[0] * len(shape)), (1, *shape), shape)
        else:
            yield Chunk(name, key, shape, (0,) * len(shape), shape, shape)


def extra_state_keys(model: ModelConfig) -> Iterator[str]:
    """Unique keys of the `_extra_state` objects megatron-core saves for the linear layers."""
    for template in _LINEARS:
        if template.startswith(_D):
            n = model.language.num_layers
            yield from (f"{template.replace('layers.{i}.', 'layers.')}._extra_state/shard_{i}_{n}" for i in range(n))
        elif "{i}" in template:
            yield from (f"{template.replace('{i}', str(i))}._extra_state/shard_0_1"
                        for i in range(model.vision.num_layers))
        else:
            yield f"{template}._extra_state/shard_0_1"
