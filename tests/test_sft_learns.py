"""The SFT trainer learns (tiny VLM, real megatron-core at TP2 on gloo), and connector-only tuning changes the
connector's parameters and nothing else."""

import pytest

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess


def test_sft_learns_and_connector_only_touches_only_the_connector(tmp_path):
    r = run_distributed("tests.sft_workers:sft_then_connector_only", 2, timeout_s=900, workdir=str(tmp_path))[0]
    losses = r["losses"]
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps, well-formed {r['well_formed']:.2f}")
    assert losses[-1] <= 0.5 * losses[0], losses[::25]
    assert r["well_formed"] >= 0.9, r["examples"]
    assert r["changed_outside_connector"] == []
    assert r["connector_changed"] == r["connector_params"] and len(r["connector_params"]) == 6
