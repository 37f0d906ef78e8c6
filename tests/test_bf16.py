"""bf16 end to end on CPU (CPU bf16 matmuls work): the dtype path the 38B recipes take on GPU — bf16 parameters and
activations, fp32 main parameters and gradients in megatron's distributed optimizer — at TP2·PP2, for an SFT step
and a GRPO step, against the same steps in fp32 from the same weights."""

import pytest

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess


def test_bf16_sft_and_grpo_steps_at_tp2_pp2_match_fp32(tmp_path):
    ranks = run_distributed("tests.mp_workers:bf16_vs_fp32_steps", 4, timeout_s=400, workdir=str(tmp_path))[0]
    for rank, result in enumerate(ranks):
        for kind in ("sft", "grpo"):
            r = result[kind]
            print(rank, kind, {k: v for k, v in r.items() if "dtypes" not in k})
            assert r["param_dtypes"] == ["torch.bfloat16"], r  # every model parameter in bf16 ...
            assert r["main_param_dtypes"] == ["torch.float32"], r  # ... updated through fp32 main params
            # bf16 has 8 mantissa bits (relative rounding 2^-9 = 2e-3): losses and gradient norms agree to ~1%
            assert abs(r["loss_bf16"] - r["loss_fp32"]) <= 0.02 * abs(r["loss_fp32"]) + 1e-3, r
            assert r["loss_fp32"] != 0.0, r  # the GRPO advantages are not symmetric: the loss is not trivially 0
            assert abs(r["grad_norm_bf16"] - r["grad_norm_fp32"]) <= 0.05 * r["grad_norm_fp32"], r
            # after one Adam step (lr 1e-3: each weight moves by ~1e-3), the weights agree up to bf16 storage rounding
            # plus at most two Adam steps (a sign flip of a near-zero gradient)
            assert r["param_excess"] <= 2.5e-3, r


    # issue 15: each group's image set through the ViT once, spliced into its rows, gives the unshared step's update
    # (fp32, SGD lr 1: the update is the gradient) with half the ViT tiles (2 prompts x 2 responses, 2 tiles each)
    shared = ranks[0]["shared_vision"]
    print("shared vision forward at TP2·PP2:", shared)
    assert shared["max_update_diff"] <= 1e-5, shared
    assert shared["loss_shared"] == pytest.approx(shared["loss_unshared"], abs=1e-6) and shared["loss_shared"] != 0
    assert shared["grad_norm_shared"] == pytest.approx(shared["grad_norm_unshared"], rel=1e-5)
    encoded, held, per_row = shared["counts_shared"]
    assert (held, per_row) == (4.0, 8.0) and encoded == 2 * held  # old-logprob pass + training pass
    assert shared["counts_unshared"] == [16.0, 8.0, 8.0]
    # microbatches by token budget: variable shapes through the pipeline (p2p sends shapes first), same update
    assert shared["shapes_budget"] == [(2, 24), (1, 32), (1, 32)] and shared["shapes_shared"] == [(2, 32), (2, 32)]
    assert shared["max_update_diff_budget"] <= 1e-5, shared
    assert shared["loss_budget"] == pytest.approx(shared["loss_unshared"], abs=1e-6)
