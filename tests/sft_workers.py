"""Functions run inside spawned ranks by tests/test_sft.py (real megatron-core on gloo, TP2)."""

from __future__ import annotations

import time

import torch

RECIPE = "examples/tiny_cpu_sft.yaml"


def _cfg(workdir: str, name: str, overrides: list[str]):
    from megatron_r1v3.presets import load_config

    return load_config(RECIPE, [f"output_dir={workdir}/{name}", f"data.toy_dir={workdir}/toy", *overrides])


def sft_then_connector_only(workdir: str) -> dict:
    """Cold-start SFT (100 steps), 16 held-out greedy answers, then 5 connector-only steps from its checkpoint."""
    from megatron_r1v3.sft.trainer import run_sft

    cfg = _cfg(workdir, "sft", ["checkpoint.save_every=0", "train.eval_every=0", "train.heldout_samples=16",
                                   "train.steps=100"])
    sft = run_sft(cfg)
    held = sft["heldout"]
    before = {n: p.detach().clone() for c in sft["chunks"] for n, p in c.named_parameters()}

    conn_cfg = _cfg(workdir, "conn", ["train.trainable=connector_only", f"checkpoint.load={workdir}/sft/checkpoints",
                                      "checkpoint.resume=false", "train.steps=5", "train.eval_every=0",
                                      "checkpoint.save_every=0", "train.heldout_samples=0"])
    conn = run_sft(conn_cfg)
    after = {n: p.detach() for c in conn["chunks"] for n, p in c.named_parameters()}
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    return {
        "losses": sft["losses"], "well_formed": held["well_formed"], "accuracy": held["accuracy"],
        "examples": [i["response"] for i in held["items"][:3]],
        "changed_outside_connector": [n for n in changed if not n.startswith("mlp1.")],
        "connector_params": [n for n in before if n.startswith("mlp1.")],
        "connector_changed": [n for n in changed if n.startswith("mlp1.")],
    }


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
