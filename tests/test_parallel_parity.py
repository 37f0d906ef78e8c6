"""The tiny VLM through real megatron-core on gloo: every TP/PP/VPP/DP layout equals the TP1·PP1 reference."""

import pytest
import torch

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess


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
        assert r["max_abs_diff"] <= 1e-5, (name, r)


def test_four_ranks_tp2_pp2_logits_and_tp2_dp2_optimizer_step(workdir):
    result = run_distributed("tests.mp_workers:four_rank_checks", 4, timeout_s=400, workdir=str(workdir))[0]
    assert result["tp2_pp2"]["dp"] == 1 and result["tp2_pp2"]["max_abs_diff"] <= 1e-5, result["tp2_pp2"]
    sgd, adam = result["sgd_tp2_dp2"], result["adam_tp2_dp2"]
    assert sgd["update_ok"] and sgd["loss"] > 0 and sgd["grad_norm"] > 0
    assert sgd["max_param_diff"] <= 1e-6, sgd
    # sequence parallel (decoder only; ViT and connector batch-first, unsharded): same step as TP1
    sp = result["sgd_tp2_sp_dp2"]
    assert sp["max_param_diff"] <= 1e-5, sp
    assert abs(sp["loss"] - sp["reference"]["loss"]) <= 1e-5, sp
    assert abs(sp["grad_norm"] - sp["reference"]["grad_norm"]) <= 1e-5 * sp["reference"]["grad_norm"], sp
    # Adam's first step is ~lr*sign(g): fp32 reduction-order noise near g=0 is amplified (platform.md saw 8e-5 on
    # this machine kind; measured here 2.4e-5). SGD above is the tight equality check; this bound is 0.1*lr.
    assert adam["max_param_diff"] <= 1e-4, adam
    pipelined = result["adam_tp2_pp2"]
    assert abs(pipelined["loss"] - adam["loss"]) <= 1e-5 and pipelined["max_param_diff"] <= 1e-4, pipelined
