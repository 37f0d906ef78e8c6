"""Choose which parameters train, by name: `full`, `connector_only`, `freeze_vision`, or regex patterns.

Applied before megatron DDP wrapping (DDP and the optimizer only see parameters with requires_grad). Names are the
module paths of `R1V3Model` (`vision_model.*`, `mlp1.*`, `language_model.*`), identical on every layout.
"""

from __future__ import annotations

import re

import torch

PRESETS = {
    "full": (r".*",),
    "connector_only": (r"^mlp1\.",),
    "freeze_vision": (r"^mlp1\.", r"^language_model\."),
    "freeze_connector": (r"^vision_model\.", r"^language_model\."),  # the report's RL ablation (tools/findings.py)
}


def trainable_patterns(spec: str) -> tuple[str, ...]:
    """`full`, `connector_only`, `freeze_vision`, or comma-separated regexes (e.g. `^mlp1\\.,layers\\.6[0-3]`)."""
    if spec in PRESETS:
        return PRESETS[spec]
    patterns = tuple(p.strip() for p in spec.split(",") if p.strip())
    if not patterns:
        raise ValueError(f"train.trainable={spec!r}: give a preset ({', '.join(PRESETS)}) or regex patterns")
    for p in patterns:
        re.compile(p)
    return patterns


def apply_trainable(chunks: list[torch.nn.Module], spec: str) -> dict[str, int]:
    """Set requires_grad by name on this rank's chunks; returns {'trainable': n, 'frozen': m} parameter counts."""
    compiled = [re.compile(p) for p in trainable_patterns(spec)]
    counts = {"trainable": 0, "frozen": 0}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            train = any(p.search(name) for p in compiled)
            param.requires_grad_(train)
            counts["trainable" if train else "frozen"] += param.numel()
    return counts
