"""One checkpoint key set for the TE and the local layer spec, checked without Transformer Engine.

The TE model's keys are derived from megatron-core's own TE layer spec (built with a stand-in for the TE spec
provider, which needs TE to import) and from our connector's TE branch (built with stand-ins for the two TE
layers), combined with the table below of the names each TE module kind registers. They must equal, tensor for
tensor, the keys the real local model saves and the converter writes (`bridge/mcore_layout.py`); the only
difference allowed is TE-only `_extra_state` objects, which `models/weights.load_model` loads as None. What only a
GPU with TE can show (TE's real modules, FP8 metadata round trips) is not covered here.

The worker-based tests save and load through megatron's dist_checkpointing on one spawned rank
(tests/checkpoint_key_workers.py): the connector norm under the TE names, bit-exact; a model with TE-only
extra-state objects against a local checkpoint and back; the pre-unification connector keys failing by name; and
a checkpoint converted by `r1v3 convert hf-to-megatron` loading into the model.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from megatron_r1v3.bridge import mcore_layout
from megatron_r1v3.bridge.mapping import RULES
from megatron_r1v3.presets import tiny

# --- what each Transformer Engine module kind registers in its state_dict (TE 2.x; source: NVIDIA/TransformerEngine)
# LayerNormLinear — transformer_engine/pytorch/module/layernorm_linear.py (`LayerNormLinear.__init__`):
#   `layer_norm_weight`, `layer_norm_bias` unless normalization == "RMSNorm", `weight`, `bias` only when bias=True
#   (otherwise a plain tensor attribute, not registered); `_extra_state` from `TransformerEngineBaseModule
#   .get_extra_state` (transformer_engine/pytorch/module/base.py).
# Linear — transformer_engine/pytorch/module/linear.py: `weight`, `bias` when bias=True, `_extra_state` (base.py).
# DotProductAttention — transformer_engine/pytorch/attention/dot_product_attention/dot_product_attention.py: no
#   parameters (`softmax_offset` only with softmax_type="learnable", unused here), `_extra_state` (base.py);
#   megatron-core 0.16's `TEDotProductAttention.sharded_state_dict` leaves it out of checkpoints.
# Norm (megatron's TENorm -> te.pytorch.RMSNorm / LayerNorm) — transformer_engine/pytorch/module/rmsnorm.py,
#   layernorm.py over ops/basic/rmsnorm.py (`weight`) and ops/basic/layer_norm.py (`weight`, `bias`);
#   `_extra_state` from `BasicOperation.get_extra_state` (transformer_engine/pytorch/ops/op.py).
LAYER_NORM_LINEAR, LINEAR, CORE_ATTENTION, NORM = "LayerNormLinear", "Linear", "DotProductAttention", "Norm"


def te_names(kind: str, bias: bool, normalization: str) -> tuple[list[str], list[str]]:
    """(parameter names, extra-state names) a TE module of `kind` registers."""
    layer_norm = ["weight"] + (["bias"] if normalization == "LayerNorm" else [])
    params = {
        LAYER_NORM_LINEAR: [f"layer_norm_{n}" for n in layer_norm] + ["weight"] + ["bias"] * bias,
        LINEAR: ["weight"] + ["bias"] * bias,
        CORE_ATTENTION: [],
        NORM: layer_norm,
    }[kind]
    return params, ["_extra_state"]


# TE-only `_extra_state` objects a local checkpoint lacks (the loader fills None; TE keeps fresh FP8 metadata)
TE_ONLY_OBJECTS = {
    "language_model.decoder.layers.self_attention.core_attention._extra_state",
    "language_model.decoder.final_layernorm._extra_state",
}
SCOPE = ("language_model.decoder.", "mlp1.")  # what the layer spec changes; embeddings, output layer, ViT do not


def _stand_in(kind: str) -> type:
    """A class marking a TE role in a spec; instantiated (for the connector) it registers the table's names."""

    class StandIn(torch.nn.Module):
        KIND = kind

        def __init__(self, input_size=None, output_size=None, *, config=None, bias=False, **unused):
            super().__init__()
            params, _ = te_names(kind, bias, config.normalization)
            shapes = {"weight": (output_size, input_size), "bias": (output_size,),
                      "layer_norm_weight": (input_size,), "layer_norm_bias": (input_size,)}
            for name in params:
                self.register_parameter(name, torch.nn.Parameter(torch.empty(shapes[name])))

        def get_extra_state(self):
            return torch.empty(0, dtype=torch.uint8)  # TE without FP8: an empty byte tensor

        def set_extra_state(self, state):
            pass

    StandIn.__name__ = f"TE{kind}StandIn"
    return StandIn


STAND_INS = {kind: _stand_in(kind) for kind in (LAYER_NORM_LINEAR, LINEAR, CORE_ATTENTION, NORM)}


class StandInTESpecProvider:
    """megatron-core's `TESpecProvider` (megatron/core/extensions/transformer_engine_spec_provider.py) with the TE
    classes replaced by stand-ins: the same roles, no TE import."""

    def linear(self):
        return STAND_INS[LINEAR]

    def column_parallel_linear(self):
        return STAND_INS[LINEAR]

    def row_parallel_linear(self):
        return STAND_INS[LINEAR]

    def fuse_layernorm_and_linear(self):
        return True

    def column_parallel_layer_norm_linear(self):
        return STAND_INS[LAYER_NORM_LINEAR]

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False):
        return STAND_INS[NORM]

    def core_attention(self):
        return STAND_INS[CORE_ATTENTION]

    def grouped_mlp_modules(self, moe_use_grouped_gemm, moe_use_legacy_grouped_gemm):
        raise AssertionError("no MoE in this model")

    def activation_func(self):
        raise AssertionError("the TE activation op is not used")


def spec_modules(spec, path: str = "") -> dict[str, str]:
    """{submodule path: TE kind} of every stand-in in a ModuleSpec tree. Other leaves must hold no parameters."""
    from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
    from megatron.core.transformer.spec_utils import ModuleSpec

    module = spec.module if isinstance(spec, ModuleSpec) else spec
    if isinstance(module, type) and hasattr(module, "KIND"):
        return {path.rstrip("."): module.KIND}
    if isinstance(spec, ModuleSpec) and spec.submodules is not None:
        found = {}
        for field in dataclasses.fields(spec.submodules):
            if field.name != "sharded_state_dict_keys_map":
                found.update(spec_modules(getattr(spec.submodules, field.name), f"{path}{field.name}."))
        return found
    assert spec is None or not isinstance(spec, type) or issubclass(spec, (IdentityOp, IdentityFuncOp)), (
        f"{path}: {spec} is neither a TE role nor parameter-free: extend the TE names table")
    return {}  # IdentityOp, bias-dropout-add functions, no activation module


def _keys(sharded: dict) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({tensor key: global shape}, {object key}) of a sharded state dict (factories applied)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(sharded)
    tensors, objects = {}, set()
    for v in nested_values(sharded):
        if isinstance(v, ShardedTensor):
            tensors[v.key] = tuple(v.global_shape)
        elif isinstance(v, ShardedObject):
            objects.add(v.key)
    return tensors, objects


def _in_scope(keys):
    return {k for k in keys if k.startswith(SCOPE)}


@pytest.fixture
def tp1(monkeypatch):
    """A single-process TP1 megatron set-up of the tiny model (local spec), torn down afterwards."""
    from megatron_r1v3.config import PrecisionConfig, RunConfig
    from megatron_r1v3.parallel import destroy_parallel, init_parallel
    from megatron_r1v3.parallel.env import free_port

    # init_parallel would set them for good; later tests must not inherit this process's port
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    cfg = RunConfig(model=tiny(), precision=PrecisionConfig(transformer_impl="local", params_dtype="fp32"))
    init_parallel(cfg)
    yield cfg
    destroy_parallel()


def te_model_keys(cfg, monkeypatch) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """({tensor key: shape or None}, {object key}) a TE model would save for the decoder and the connector."""
    import megatron.core.extensions.transformer_engine as te_ext
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs
    import megatron.core.transformer.transformer_block as block

    from megatron_r1v3.models import specs
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.connector import Connector
    from megatron_r1v3.parallel.init import current_layout

    monkeypatch.setattr(gpt_specs, "TESpecProvider", StandInTESpecProvider, raising=False)
    monkeypatch.setattr(block, "LayerNormImpl", STAND_INS[NORM])  # the TE block's final norm is TENorm
    monkeypatch.setattr(te_ext, "TELayerNormColumnParallelLinear", STAND_INS[LAYER_NORM_LINEAR])
    monkeypatch.setattr(te_ext, "TERowParallelLinear", STAND_INS[LINEAR])
    monkeypatch.setattr(specs, "te_available", lambda: True)
    te_cfg = dataclasses.replace(cfg, precision=dataclasses.replace(cfg.precision,
                                                                    transformer_impl="transformer_engine"))
    assert specs.use_transformer_engine(te_cfg)
    lm_cfg = specs.language_config(te_cfg, current_layout())
    spec = specs.decoder_block_spec(te_cfg, lm_cfg, None)  # the TE spec as our build uses it (a layer spec)
    layer_modules = spec_modules(spec)
    assert layer_modules == {"self_attention.linear_qkv": LAYER_NORM_LINEAR,
                             "self_attention.core_attention": CORE_ATTENTION,
                             "self_attention.linear_proj": LINEAR, "mlp.linear_fc1": LAYER_NORM_LINEAR,
                             "mlp.linear_fc2": LINEAR}, layer_modules

    # bias: an argument megatron's SelfAttention / MLP pass alike to whichever class the spec names
    [local] = build_model(cfg, meta=True)
    local_layer = local.language_model.decoder.layers[0]
    keys_map = spec.submodules.sharded_state_dict_keys_map  # TransformerLayer renames by it (TE op-fuser MLP only)

    def layer_key(name: str) -> str:  # stacked layers: no layer index; first matching prefix wins, as in megatron
        old = next((o for o in keys_map if name.startswith(o)), None)
        return "language_model.decoder.layers." + (name if old is None else keys_map[old] + name[len(old):])

    tensors, objects = {}, set()
    for path, kind in layer_modules.items():
        bias = getattr(local_layer.get_submodule(path), "bias", None) is not None
        params, extra = te_names(kind, bias, lm_cfg.normalization)
        tensors.update({layer_key(f"{path}.{n}"): None for n in params})
        objects.update(layer_key(f"{path}.{n}") for n in extra)
    final_norm = block._get_block_submodules(lm_cfg, spec).layer_norm
    params, extra = te_names(final_norm.KIND, False, lm_cfg.normalization)
    tensors.update({f"language_model.decoder.final_layernorm.{n}": None for n in params})
    objects.update(f"language_model.decoder.final_layernorm.{n}" for n in extra)

    # the connector: our TE branch built with the stand-ins, saved through its real sharded_state_dict
    conn_cfg = specs.connector_config(te_cfg, lm_cfg)
    m = cfg.model
    with torch.device("meta"):
        conn = Connector(conn_cfg, m.vision.hidden_size, m.language.hidden_size, m.connector.downsample_ratio,
                         use_te=True)
    assert conn.layer_norm is None and isinstance(conn.linear_fc1, STAND_INS[LAYER_NORM_LINEAR])
    conn_tensors, conn_objects = _keys(conn.sharded_state_dict(prefix="mlp1."))
    # TE-spec parameter names = the table's TE aliases (what export and the refit look up)
    aliases = {r.megatron[-1] for r in RULES if r.megatron[0].startswith("mlp1.")}
    assert {f"mlp1.{n}" for n, _ in conn.named_parameters()} == aliases
    return {**tensors, **conn_tensors}, objects | conn_objects


def test_te_spec_saves_the_keys_local_and_converted_checkpoints_hold(tp1, monkeypatch):
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import model_sharded_state_dict, optional_on_load

    te_tensors, te_objects = te_model_keys(tp1, monkeypatch)
    local_tensors, local_objects = _keys(model_sharded_state_dict(build_model(tp1, meta=True)))
    layout_tensors = {c.key: c.global_shape for c in mcore_layout.chunks(tp1.model)}
    layout_objects = {k.split("/")[0] for k in mcore_layout.extra_state_keys(tp1.model)}

    # tensors: one key set, whatever wrote the checkpoint
    assert set(te_tensors) == _in_scope(local_tensors) == _in_scope(layout_tensors)
    assert local_tensors == layout_tensors  # global shapes too (TP1 here; TP2·PP2 in test_conversion)
    for key, shape in te_tensors.items():  # the connector's stand-ins have shapes: the TE layers' full shapes
        assert shape is None or shape == local_tensors[key], key
    assert "mlp1.linear_fc1.layer_norm_weight" in local_tensors and "mlp1.linear_fc1.layer_norm_bias" in te_tensors
    assert not any(k.startswith("mlp1.layer_norm") for k in local_tensors)

    # extra-state objects: the local checkpoint's are the TE model's, less the declared TE-only ones
    assert local_objects == layout_objects
    assert _in_scope(local_objects) <= te_objects
    assert te_objects - _in_scope(local_objects) == TE_ONLY_OBJECTS
    assert all(optional_on_load(k) for k in TE_ONLY_OBJECTS)  # the loader fills them with None


def test_connector_rules_spell_local_name_then_checkpoint_key():
    """The connector's rename map turns each rule's local name into its TE alias, and only there."""
    from megatron_r1v3.models.connector import SHARDED_KEYS_MAP

    for rule in RULES:
        if not rule.megatron[0].startswith("mlp1."):
            continue
        local = rule.megatron[0][len("mlp1."):]
        renamed = next((new + local[len(old):] for old, new in SHARDED_KEYS_MAP.items() if local.startswith(old)),
                       local)
        assert "mlp1." + renamed == rule.megatron[-1], rule.megatron


# --- save / load through dist_checkpointing (one spawned rank) ---


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from megatron_r1v3.bridge.random_hf import write_random_hf_checkpoint
    from megatron_r1v3.parallel.spawn import run_distributed

    root = tmp_path_factory.mktemp("keys")
    hf = write_random_hf_checkpoint(root / "hf", tiny(), "native", seed=3)
    out = subprocess.run([sys.executable, "-m", "megatron_r1v3.cli", "convert", "hf-to-megatron", "--hf", str(hf),
                          "--out", str(root / "meg")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    [result] = run_distributed("tests.checkpoint_key_workers:save_and_load", 1, timeout_s=300,
                               workdir=str(root), hf_dir=str(hf), converted_dir=str(root / "meg"))
    return result


@pytest.mark.multiprocess
def test_a_save_starts_no_manager_process(loaded):
    """`weights.write_results_in_process`: megatron-core's writer would spawn a Manager server (a fresh interpreter
    importing torch: ~2.7 s per job) to carry a synchronous save's results; the round trip below stays bit-exact."""
    assert loaded["children_after_save"] == [] and loaded["megatron_results_queue"] == "None"
    assert loaded["round_trip_mismatches"] == []


@pytest.mark.multiprocess
def test_converted_checkpoint_loads_into_the_model(loaded):
    assert loaded["converted_connector_keys"] == ["mlp1.linear_fc1.layer_norm_bias",
                                                  "mlp1.linear_fc1.layer_norm_weight"]
    assert loaded["converted_mismatches"] == [] and loaded["converted_params"] > 60


@pytest.mark.multiprocess
def test_local_model_saves_connector_norm_under_te_names_and_loads_bit_exactly(loaded):
    assert loaded["saved_connector_keys"] == sorted(
        f"mlp1.linear_fc{i}.{n}" for i, names in ((1, ("layer_norm_weight", "layer_norm_bias", "weight", "bias")),
                                                  (2, ("weight", "bias"))) for n in names)
    assert loaded["norm_was_random"] and loaded["round_trip_mismatches"] == []


@pytest.mark.multiprocess
def test_te_only_extra_state_loads_both_ways(loaded):
    """A model with TE-only `_extra_state` (final norm, every layer's core attention) loads a local checkpoint (it
    arrives as None) and a local model loads the checkpoint that model writes (its extra objects are skipped);
    weights bit-exact both ways. megatron-core 0.16 leaves core attention's extra state out of checkpoints."""
    assert loaded["te_like_received"] == [None] * (tiny().language.num_layers + 1)
    assert loaded["te_like_extra_objects"] == ["language_model.decoder.final_layernorm._extra_state"]
    assert set(loaded["te_like_extra_objects"]) <= TE_ONLY_OBJECTS
    assert loaded["te_like_mismatches"] == [] and loaded["back_to_local_mismatches"] == []


@pytest.mark.multiprocess
def test_checkpoint_with_the_old_connector_keys_fails_naming_them(loaded):
    msg = loaded["legacy_error"]
    assert msg.startswith("CheckpointMismatch")
    assert ("lacks 2 tensor(s) the model needs: mlp1.linear_fc1.layer_norm_bias, mlp1.linear_fc1.layer_norm_weight"
            in msg)
    assert "holds 2 tensor(s) the model does not: mlp1.layer_norm.bias, mlp1.layer_norm.weight" in msg
