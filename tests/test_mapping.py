"""The declarative mapping table: every transform inverts exactly, names match transformers' native model."""

import pytest
import torch

from megatron_r1v3.bridge.mapping import (
    LAYOUTS,
    RULES,
    MappingError,
    expected_hf_names,
    find_rule,
    hf_names,
    to_hf,
    to_megatron,
)
from megatron_r1v3.bridge.random_hf import native_shapes
from megatron_r1v3.models.presets import r1v3_38b, tiny


def model_3heads():
    m = tiny()
    m.vision.hidden_size, m.vision.num_heads, m.vision.head_pad_multiple = 48, 3, 2
    return m


def test_manifest_equals_transformers_native_state_dict():
    for model in (model_3heads(), tiny()):
        assert sorted(expected_hf_names(model, "native")) == sorted(native_shapes(model))


def test_every_rule_covers_both_layouts_and_the_38b_manifest_is_complete():
    for rule in RULES:
        assert set(rule.hf) == set(LAYOUTS), rule.megatron
    names = list(expected_hf_names(r1v3_38b(), "remote"))
    assert len(names) == len(set(names))
    assert "vision_model.encoder.layers.44.attn.qkv.weight" in names and "mlp1.3.bias" in names
    assert "language_model.model.layers.63.mlp.gate_proj.weight" in names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transforms_round_trip_exactly_with_padding(layout):
    model = model_3heads()
    shapes = native_shapes(model)
    g = torch.Generator().manual_seed(0)
    hf_tensors = {}
    from megatron_r1v3.bridge.mapping import convert_layout

    native = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    hf_tensors = dict(convert_layout(native.__getitem__, model, "native", layout))
    seen = set()
    for rule in RULES:
        name = rule.megatron[0].replace("{i}", "1")
        full, used = to_megatron(name, hf_tensors.__getitem__, model, layout)
        if "attn.qkv.weight" in name:
            assert full.shape[0] == 3 * 4 * 16  # padded to 4 heads; dummy rows are zero
            assert torch.count_nonzero(full.view(4, 3, 16, -1)[3]) == 0
        if name.endswith("word_embeddings.weight"):
            assert full.shape[0] == 1024 and torch.count_nonzero(full[1000:]) == 0
        back = dict(to_hf(name, full, model, layout))
        assert sorted(back) == sorted(used)
        for n in used:
            assert torch.equal(back[n], hf_tensors[n]), n
        seen.update(used)
    layer1 = {n for n in hf_tensors if ".1." in n or not any(f".{i}." in n for i in range(4))}
    assert layer1 <= seen


def test_gqa_grouping_matches_megatron_layout():
    model = tiny()  # 4 query heads in 2 KV groups
    lm = model.language
    d, h, r = lm.head_dim, lm.hidden_size, lm.num_heads // lm.num_kv_heads
    q, k, v = (torch.arange(n * d * h, dtype=torch.float32).view(n * d, h) + off
               for n, off in ((lm.num_heads, 0), (lm.num_kv_heads, 1e6), (lm.num_kv_heads, 2e6)))
    rule, _ = find_rule("language_model.decoder.layers.0.self_attention.linear_qkv.weight")
    full = rule.transform.to_megatron([q, k, v], model)
    group0 = full[: (r + 2) * d]  # group 0 = query heads 0..r-1, then key head 0, then value head 0
    assert torch.equal(group0[: r * d], q[: r * d])
    assert torch.equal(group0[r * d : (r + 1) * d], k[:d]) and torch.equal(group0[(r + 1) * d :], v[:d])


def test_unknown_names_are_named():
    with pytest.raises(MappingError, match="decoder.layers.0.self_attention.foo"):
        find_rule("language_model.decoder.layers.0.self_attention.foo")
    with pytest.raises(MappingError, match="unknown HF layout 'llava'"):
        hf_names(RULES[0], None, "llava")
