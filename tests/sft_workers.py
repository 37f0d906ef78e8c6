"""Functions run inside spawned ranks by tests/test_sft.py (real megatron-core on gloo, TP2)."""

from __future__ import annotations

import time

RECIPE = "examples/tiny_cpu_sft.yaml"


def resume_each(toy: str, cases: list[tuple[str, list[str]]]) -> list[dict]:
    """Resume each (output_dir, overrides) run in turn in this one launch; what each raised and how fast."""
    from megatron_r1v3.models.weights import CheckpointError
    from megatron_r1v3.presets import load_config
    from megatron_r1v3.sft.trainer import run_sft

    out = []
    for output_dir, overrides in cases:
        cfg = load_config(RECIPE, [f"output_dir={output_dir}", f"data.toy_dir={toy}", "logging.tensorboard=false",
                                   *overrides])
        t0 = time.monotonic()
        try:
            run_sft(cfg)
            error = {"type": None, "error": None}
        except CheckpointError as exc:
            error = {"type": type(exc).__name__, "error": str(exc)}
        out.append({**error, "seconds": time.monotonic() - t0})
    return out
