"""Config loading (preset → YAML → overrides) and start-time validation (`plan_layout`: the config's fields and
the layout rules) that names the offending fields."""

import pytest

from megatron_r1v3.config import ConfigError, to_yaml
from megatron_r1v3.data.sources import check_toy_tasks
from megatron_r1v3.parallel.layout import ParallelLayout, plan_layout
from megatron_r1v3.presets import load_config


def test_preset_yaml_and_overrides_merge(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  preset: r1v3-38b\nparallel:\n  tensor: 8\noptimizer:\n  lr: 2.0e-5\n")
    cfg = load_config(recipe, ["parallel.pipeline=2", "model.language.num_layers=32"])
    assert cfg.model.preset == "r1v3-38b" and cfg.model.vision.num_layers == 45
    assert cfg.parallel.tensor == 8 and cfg.parallel.pipeline == 2 and cfg.optimizer.lr == 2e-5
    assert cfg.model.language.num_layers == 32 and cfg.model.tokens_per_tile == 256
    assert cfg.model.vision.padded_heads == 32
    assert "preset: r1v3-38b" in to_yaml(cfg)


def test_tiny_preset_defaults():
    cfg = load_config(None, [])
    assert cfg.model.preset == "tiny" and cfg.model.tokens_per_tile == 4
    assert cfg.model.language.vocab_size % 128  # padding path exercised


@pytest.mark.parametrize(
    "overrides, world, fields",
    [
        (["parallel.tensor=4"], 4, ["parallel.tensor=4", "num_kv_heads=2"]),
        (["parallel.pipeline=8"], 8, ["parallel.pipeline=8", "num_layers=4"]),
        (["parallel.tensor=2"], 3, ["world size 3", "parallel.tensor*parallel.pipeline*parallel.context"]),
        (["parallel.data=4"], 2, ["parallel.data=4"]),
        (["parallel.pipeline=3"], 3, ["num_layers=4", "parallel.pipeline=3"]),
        (["parallel.virtual_pipeline=2"], 1, ["parallel.virtual_pipeline=2"]),
        (["precision.fp8=hybrid"], 1, ["precision.fp8='hybrid'", "transformer_engine is not importable"]),
        (["parallel.context=2"], 2, ["parallel.context=2 needs Transformer Engine"]),
        (["parallel.sequence_parallel=true", "parallel.tensor=2", "data.seq_length=63"], 2,
         ["sequence length 63 is not a multiple of 2"]),
        (["model.vision.num_heads=3", "model.vision.hidden_size=48", "model.vision.head_pad_multiple=1",
          "parallel.tensor=2"], 2, ["padded ViT heads 3", "head_pad_multiple=1"]),
        (["optimizer.name=sgd"], 1, ["optimizer.use_distributed_optimizer"]),
        (["optimizer.lr=1e-4", "optimizer.min_lr=1e-3"], 1, ["optimizer.min_lr=0.001 > optimizer.lr=0.0001"]),
        (["rl.agg=sum", "rl.samples_per_prompt=1"], 1, ["rl.agg='sum'", "rl.samples_per_prompt=1"]),
        (["rl.old_logprobs=vllm", "rl.length_schedule=[[5]]"], 1, ["rl.old_logprobs='vllm'", "rl.length_schedule[0]"]),
        (["model.language.vocab_size=999", "model.language.make_vocab_size_divisible_by=1", "parallel.tensor=2"],
         2, ["padded vocab 999", "parallel.tensor=2"]),
        (["parallel.pipeline=2", "parallel.virtual_pipeline=2", "train.global_batch_size=3"], 2,
         ["microbatches (3)", "parallel.pipeline=2"]),
        (["data.seq_length=8192"], 1, ["sequence length 8192 > model.language.max_position_embeddings=4096"]),
        (["train.global_batch_size=6", "train.micro_batch_size=4"], 1, ["train.global_batch_size=6"]),
    ],
)
def test_invalid_combinations_fail_at_start_naming_fields(overrides, world, fields):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        plan_layout(cfg, world, te_available=False)
    for field in fields:
        assert field in str(err.value), (field, str(err.value))


def test_unknown_toy_task_is_named():
    with pytest.raises(ConfigError, match="data.toy_tasks"):
        check_toy_tasks(["colour_mc", "spelling"])
    check_toy_tasks(["colour_mc", "colour_word"])


def test_valid_layout_derives_data_parallel_without_touching_the_config():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"])
    layout = plan_layout(cfg, 8)
    assert (layout.tp, layout.pp, layout.dp, layout.world) == (2, 2, 2, 8)
    assert cfg.parallel.data == -1  # the checked config is not modified
    assert plan_layout(cfg, 8) == layout  # so checking twice gives the same answer
    assert ParallelLayout.processes_needed(cfg.parallel) == 4


def test_layout_rules():
    sp = ParallelLayout(tp=4, sequence_parallel=True)
    assert sp.seq_multiple == 4 and ParallelLayout(tp=4, cp=2).seq_multiple == 4
    assert ParallelLayout(tp=2, cp=2, sequence_parallel=True).seq_multiple == 4
    assert ParallelLayout(pp=2, first_stage_layers=1).decoder_layers(5) == [[1], [4]]
    assert ParallelLayout(pp=2, vpp=2).decoder_layers(8) == [[2, 2], [2, 2]]
    model = load_config(None, ["model.preset=r1v3-38b"]).model
    assert any("not a multiple of 4" in e for e in sp.problems(model, te_available=True, seq_length=30))
    assert not sp.problems(model, te_available=True, seq_length=32)


def test_unknown_key_and_preset_are_named():
    with pytest.raises(ConfigError, match="parallel.tensr"):
        load_config(None, ["parallel.tensr=2"])
    with pytest.raises(ConfigError, match="model.preset='nope'"):
        load_config(None, ["model.preset=nope"])


@pytest.mark.parametrize("recipe", sorted(p.name for p in __import__("pathlib").Path("examples").glob("*.yaml")))
def test_every_example_recipe_loads_and_validates(recipe):
    cfg = load_config(f"examples/{recipe}")
    p = cfg.parallel
    plan_layout(cfg, p.tensor * p.pipeline * p.context * 2, te_available=True)  # DP2; TE assumed for GPU recipes
