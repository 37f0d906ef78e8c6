"""The tiny VLM through real megatron-core on gloo: every TP/PP/VPP/DP layout equals the TP1·PP1 reference."""

import pytest
import torch

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess
FP32 = 1e-5  # fp32 reduction-order noise; measured values in docs/performance.md


def assert_logits_compared(name: str, r: dict) -> None:
    """Every last-stage rank (TP x DP of them) compared its logits, and together they covered every sample once per
    TP rank: a run where no rank held logits would leave max_abs_diff at 0 and pass as parity."""
    assert r["ranks_compared"] == r["tp"] * r["dp"], (name, r)
    assert r["samples_compared"] == r["samples"] * r["tp"] and r["samples"] > 0, (name, r)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("parity")
    run_distributed("tests.mp_workers:reference_with_optimizer", 1, timeout_s=240, workdir=str(wd))
    return wd


def test_vit_head_padding_is_exact_at_tp1(workdir):
    ref = torch.load(workdir / "reference.pt")
    assert torch.isfinite(ref["logits_3heads"]).all()
    diff = (ref["logits_3heads_padded_tp1"] - ref["logits_3heads"]).abs().max().item()
    assert diff <= 1e-6, diff


def test_eight_ranks_tp_pp_vpp_dp_layouts_match_tp1(workdir):
    layouts = ["tp2", "pp2", "pp2_vpp2", "tp2_pp2", "tp2_vit_padded", "tp2_sp", "tp2_pp2_sp"]
    result = run_distributed("tests.mp_workers:parity", 8, timeout_s=600, workdir=str(workdir), layouts=layouts)[0]
    assert set(result) == set(layouts)
    assert result["tp2_pp2"]["dp"] == 2 and result["tp2"]["dp"] == 4  # world 8: TP2·PP2·DP2, TP2·DP4
    for name, r in result.items():
        print(f"{name}: max |logit diff| vs TP1 {r['max_abs_diff']:.2e} over {r['samples_compared']} sample-ranks")
        assert_logits_compared(name, r)
        assert r["max_abs_diff"] <= FP32, (name, r)


def test_four_ranks_tp2_pp2_logits_and_tp2_dp2_optimizer_step(workdir):
    result = run_distributed("tests.mp_workers:four_rank_checks", 4, timeout_s=400, workdir=str(workdir))[0]
    assert result["tp2_pp2"]["dp"] == 1 and result["tp2_pp2"]["max_abs_diff"] <= FP32, result["tp2_pp2"]
    assert_logits_compared("tp2_pp2", result["tp2_pp2"])
    sgd, adam = result["sgd_tp2_dp2"], result["adam_tp2_dp2"]
    assert sgd["update_ok"] and sgd["loss"] > 0 and sgd["grad_norm"] > 0
    assert sgd["max_param_diff"] <= 1e-6, sgd
    assert abs(sgd["grad_norm"] - sgd["reference"]["grad_norm"]) <= FP32 * sgd["reference"]["grad_norm"], sgd
    assert abs(sgd["loss"] - sgd["reference"]["loss"]) <= FP32, sgd
    # sequence parallel (decoder only; ViT and connector batch-first, unsharded): same step as TP1
    sp = result["sgd_tp2_sp_dp2"]
    assert sp["max_param_diff"] <= FP32, sp
    assert abs(sp["loss"] - sp["reference"]["loss"]) <= FP32, sp
    assert abs(sp["grad_norm"] - sp["reference"]["grad_norm"]) <= FP32 * sp["reference"]["grad_norm"], sp
    # the pipelined backward (+ embedding-group grad sync) at TP2·PP2 with SGD: a gradient-scale error (a grad
    # summed twice, or not at all, across stages) changes the grad norm and the step; Adam's sign-like first step
    # would hide it
    pp = result["sgd_tp2_pp2"]
    print(f"SGD step vs TP1: TP2·DP2 params {sgd['max_param_diff']:.2e}, TP2·PP2 params {pp['max_param_diff']:.2e}, "
          f"grad norm {pp['grad_norm']:.6f} vs {pp['reference']['grad_norm']:.6f}, "
          f"loss {pp['loss']:.6f} vs {pp['reference']['loss']:.6f}; Adam TP2·DP2 params {adam['max_param_diff']:.2e}")
    assert pp["update_ok"] and pp["grad_norm"] > 0
    assert abs(pp["grad_norm"] - pp["reference"]["grad_norm"]) <= FP32 * pp["reference"]["grad_norm"], pp
    assert abs(pp["loss"] - pp["reference"]["loss"]) <= FP32, pp
    assert pp["max_param_diff"] <= 1e-6, pp
    # Adam's first step is ~lr*sign(g): fp32 reduction-order noise near g=0 is amplified (platform.md saw 8e-5 on
    # this machine kind; measured here 2.4e-5). SGD above is the tight equality check; this bound is 0.1*lr.
    assert adam["max_param_diff"] <= 1e-4, adam
