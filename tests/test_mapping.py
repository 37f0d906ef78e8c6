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
    megatron_parameters,
    to_hf,
    to_megatron,
)
from megatron_r1v3.bridge.random_hf import native_shapes
from megatron_r1v3.presets import r1v3_38b, tiny


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


def _tied_without_qk_norm():
    m = tiny()
    m.language.tie_embeddings, m.vision.qk_normalization = True, False
    return m


@pytest.mark.parametrize("model", [tiny(), _tied_without_qk_norm()], ids=["tiny", "tied_no_qk_norm"])
def test_table_matches_the_built_model(model, monkeypatch):
    """(name, full shape, TP split dim, is-linear) of every parameter the table lists = the real TP1 model's, in
    registration order per component: the table cannot drift from the model."""
    from megatron_r1v3.parallel.env import free_port

    # init_parallel would set them for good; later tests (the Slurm jobs) must not inherit this process's port
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_r1v3.bridge.shard import global_named_parameters
    from megatron_r1v3.config import PrecisionConfig, RunConfig
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import destroy_parallel, init_parallel

    cfg = RunConfig(model=model, precision=PrecisionConfig(transformer_impl="local"))
    init_parallel(cfg)
    try:
        [chunk] = build_model(cfg, meta=True)
        linears = (ColumnParallelLinear, RowParallelLinear)
        linear = {id(p) for m in chunk.modules() if isinstance(m, linears) for p in m.parameters(recurse=False)}
        real = [(name, tuple(p.shape), p.partition_dim if getattr(p, "tensor_model_parallel", False) else None,
                 id(p) in linear) for name, p in global_named_parameters(chunk)]
    finally:
        destroy_parallel()
    table = [(name, rule.shape(model), rule.tp_dim, rule.linear) for rule, _, name in megatron_parameters(model)]

    def by_component(rows):
        return {c: [r for r in rows if r[0].split(".", 1)[0] == c] for c in ("language_model", "vision_model", "mlp1")}

    assert by_component(table) == by_component(real)
    assert sum(map(len, by_component(real).values())) == len(real)


def _megatron_shards(full: torch.Tensor, rule, tp: int) -> list[torch.Tensor]:
    """What Megatron's TP ranks hold of a full tensor (gated: shard r is [gate_r; up_r])."""
    if rule.tp_gated:
        gate, up = full.chunk(2, dim=rule.tp_dim)
        return [torch.cat([g, u], dim=rule.tp_dim) for g, u in zip(gate.chunk(tp, rule.tp_dim),
                                                                     up.chunk(tp, rule.tp_dim))]
    return list(full.chunk(tp, dim=rule.tp_dim))


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_to_hf_slices_tile_the_hf_tensors(tp):
    """Each TP shard of a `serve_split` tensor converts to slices that together are exactly `to_hf` of the full
    tensor (what the sliced SPMD refit hands each vLLM rank); rules vLLM splits otherwise refuse."""
    from megatron_r1v3.bridge.mapping import shard_to_hf

    model = tiny()
    model.language.vocab_size = 1000  # padded to 1024: the last shard's rows past 1000 are dropped
    if tp == 4:  # Megatron needs the KV groups to split over TP
        model.language.num_heads, model.language.num_kv_heads = 8, 4
    torch.manual_seed(0)
    split = [(rule, layer, name) for rule, layer, name in megatron_parameters(model) if rule.serve_split]
    assert {n.rsplit(".", 2)[-2] for _, _, n in split} >= {"linear_qkv", "linear_proj", "linear_fc1", "linear_fc2",
                                                           "word_embeddings", "output_layer"}
    for rule, _, name in split:
        full = torch.randn(rule.shape(model))
        want = dict(to_hf(name, full, model, "native"))
        got = {n: torch.full_like(t, float("nan")) for n, t in want.items()}
        for r, shard in enumerate(_megatron_shards(full, rule, tp)):
            for p in shard_to_hf(name, shard, model, "native", r, tp):
                assert p.full_shape == tuple(want[p.name].shape), p.name
                region = got[p.name].narrow(p.dim, p.offset, p.piece.shape[p.dim])
                assert bool(region.isnan().all()), f"{p.name}: rank {r} overlaps another rank's slice"
                region.copy_(p.piece)
        for n, t in want.items():
            assert torch.equal(got[n], t), n
    vit = next(n for r, _, n in megatron_parameters(model) if n.startswith("vision_model.") and r.tp_dim is not None)
    with pytest.raises(MappingError, match="does not split it as Megatron does"):
        shard_to_hf(vit, torch.zeros(1), model, "native", 0, 2)
