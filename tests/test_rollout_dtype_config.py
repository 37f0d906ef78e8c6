"""`rl.rollout_dtype`: auto | fp32 | bf16, checked by `config.field_errors` (resolved per device by
`rollout.engine.rollout_dtype`)."""

import pytest

from megatron_r1v3.config import ConfigError, field_errors, validate
from megatron_r1v3.presets import load_config


@pytest.mark.parametrize("value", ["auto", "fp32", "bf16"])
def test_accepted_values(value):
    cfg = load_config(None, [f"rl.rollout_dtype={value}"])
    assert cfg.rl.rollout_dtype == value and field_errors(cfg) == []


def test_default_is_auto():
    assert load_config(None, []).rl.rollout_dtype == "auto"


@pytest.mark.parametrize("value", ["fp16", "float32", "bfloat16"])
def test_other_values_are_named(value):
    cfg = load_config(None, [f"rl.rollout_dtype={value}"])
    assert field_errors(cfg) == [f"rl.rollout_dtype={value!r} must be auto, fp32 or bf16"]
    with pytest.raises(ConfigError, match="rl.rollout_dtype"):
        validate(cfg)
