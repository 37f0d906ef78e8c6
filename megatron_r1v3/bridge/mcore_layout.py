"""What megatron-core's `torch_dist` checkpoint of our model holds, computed from the model config alone.

For every parameter of the mapping table (shapes and linear modules come from its rules): its sharded key, global
shape and the chunk one process writes; plus the `_extra_state` objects of the linear layers. No model is built
and megatron is not imported, so conversion starts in a second. Global shapes do not depend on TP/PP (the vocab
and the ViT heads are padded by config, not by TP), so a checkpoint written from one process loads at every
layout; TP only has to divide the padded sizes.

megatron-core's conventions reproduced here (tests/test_conversion.py compares them with the real model's
`sharded_state_dict()` at TP2·PP2):
- one key set whatever the layer spec: a parameter's key is its Transformer Engine name (the rule's last alias) —
  megatron's local decoder layers map their norms to it, the connector its LayerNorm (`models/connector.py`);
- decoder layers are stacked: key without the layer index, a leading axis of `num_layers`, one chunk per layer;
- other keys are the module paths (ViT layers keep their index);
- every Column/RowParallelLinear but the output layer (GPTModel drops that one) has an `_extra_state` object
  (`None` for local layers), key `<module>._extra_state/shard_<offset>_<shape>` over the stacked-layer axis.
  Written as the local spec has them: a TE model's extra `_extra_state` objects (its final RMSNorm's, and core
  attention's where megatron saves it) are absent, which `models/weights.load_model` loads as `None` (TE: keep
  the fresh FP8 metadata), the same as the `None` written here for the linears.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from megatron_r1v3.bridge.mapping import DECODER, LAST, Rule, megatron_parameters
from megatron_r1v3.config import ModelConfig


@dataclass(frozen=True)
class Chunk:
    """One parameter as written: `name` (canonical, the mapping's key) -> region `offset`+`sizes` of tensor `key`."""

    name: str
    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    sizes: tuple[int, ...]
    shape: tuple[int, ...]  # the full Megatron tensor (sizes without the stacked-layer axis)


def _stacked(template: str, rule: Rule, layer: int | None, model: ModelConfig) -> tuple[str, tuple[int, ...], int]:
    """(key of `template` with `{i}` removed or filled, prefix offset, stacked size); prefix empty when not stacked."""
    if rule.stage == DECODER:
        return template.replace("{i}.", ""), (layer,), model.language.num_layers
    return template.replace("{i}", str(layer)), (), 0


def _key(rule: Rule) -> str:
    """The checkpoint key (before stacking): the TE-spec name, which is the last alias (the only name when the
    specs agree)."""
    return rule.megatron[-1]


def chunks(model: ModelConfig) -> Iterator[Chunk]:
    """Every parameter of the model as one chunk (a whole layer of a stacked tensor, or the whole tensor)."""
    for rule, layer, name in megatron_parameters(model):
        shape = rule.shape(model)
        key, prefix, stacked = _stacked(_key(rule), rule, layer, model)
        if prefix:
            yield Chunk(name, key, (stacked, *shape), (*prefix, *[0] * len(shape)), (1, *shape), shape)
        else:
            yield Chunk(name, key, shape, (0,) * len(shape), shape, shape)


def extra_state_keys(model: ModelConfig) -> Iterator[str]:
    """Unique keys of the `_extra_state` objects megatron-core saves: one per linear module of the table, but the
    output layer (the last stage's one)."""
    seen = set()
    for rule, layer, name in megatron_parameters(model):
        module = name.rsplit(".", 1)[0]
        if not rule.linear or rule.stage == LAST or module in seen:
            continue
        seen.add(module)
        key, prefix, stacked = _stacked(rule.megatron[0].rsplit(".", 1)[0], rule, layer, model)
        yield f"{key}._extra_state/shard_{layer}_{stacked}" if prefix else f"{key}._extra_state/shard_0_1"
