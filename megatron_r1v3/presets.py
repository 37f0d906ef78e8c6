"""Named model shapes (`r1v3-38b`, spec §1; `tiny`, CPU in seconds) and recipe loading: preset, then YAML, then
`key=value` overrides, merged into a typed `RunConfig`.

The layer directly above the config dataclasses: `config.py` knows no preset, so the dataclasses import nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from megatron_r1v3.config import ConfigError, ConnectorConfig, LanguageConfig, ModelConfig, RunConfig, VisionConfig


def r1v3_38b() -> ModelConfig:
    """InternViT-6B-448px-V2.5 + pixel-shuffle MLP + Qwen2.5-32B (Skywork-R1V3-38B)."""
    return ModelConfig(
        preset="r1v3-38b",
        vision=VisionConfig(),
        connector=ConnectorConfig(),
        language=LanguageConfig(),
    )


def tiny() -> ModelConfig:
    """Same architecture, toy widths: 56 px tiles, 4 image tokens per tile, 4 decoder layers, 1000-token vocab.

    The vocab size is deliberately not a multiple of 128 (exercises padding); ids of the special tokens match the
    tiny tokenizer built for the toy task. Decoder head dim 32: vLLM's CPU attention needs >= 32.
    """
    return ModelConfig(
        preset="tiny",
        vision=VisionConfig(
            image_size=56, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, ffn_hidden_size=128,
            head_pad_multiple=4,
        ),
        connector=ConnectorConfig(),
        language=LanguageConfig(
            num_layers=4, hidden_size=128, ffn_hidden_size=256, num_heads=4, num_kv_heads=2, vocab_size=1000,
            max_position_embeddings=4096,
        ),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        image_start_token_id=3,
        image_end_token_id=4,
        image_context_token_id=5,
    )


def tiny_qwen() -> ModelConfig:
    """The `tiny` shapes with Qwen2.5 / Skywork-R1V3's token ids and vocab (151674; `<|endoftext|>` 151643 is pad
    and bos, `<|im_end|>` 151645 eos, `<img>`/`</img>`/`<IMG_CONTEXT>` 151665-151667): runs the whole recipe on CPU
    with a tokenizer in the real layout (`data.tokenizer`; tests build one offline)."""
    base = tiny()
    defaults = ModelConfig()
    base.preset = "tiny-qwen"
    base.language.vocab_size = defaults.language.vocab_size
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "image_start_token_id", "image_end_token_id",
                "image_context_token_id"):
        setattr(base, key, getattr(defaults, key))
    return base


PRESETS = {"r1v3-38b": r1v3_38b, "tiny": tiny, "tiny-qwen": tiny_qwen}


def get_preset(name: str) -> ModelConfig:
    """Return a fresh ModelConfig for a preset name; unknown names list the known ones."""
    if name not in PRESETS:
        raise ConfigError(f"model.preset={name!r} is unknown; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]()


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Preset, then YAML, then `key=value` overrides; returns a typed RunConfig (not yet validated)."""
    layers = [OmegaConf.load(str(path))] if path else []
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    merged_user = OmegaConf.merge(*layers)
    preset = OmegaConf.select(merged_user, "model.preset", default="tiny")
    base = OmegaConf.structured(RunConfig(model=get_preset(preset)))
    try:
        cfg = OmegaConf.merge(base, merged_user)
    except Exception as exc:  # omegaconf names the key in its message
        raise ConfigError(f"invalid config ({path or 'overrides'}): {exc}") from exc
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]
