"""tools/fp8_bench.py: the GEMM shapes it measures are the model's, and it refuses clearly without a GPU."""

import importlib.util
import subprocess
import sys

import pytest
import torch

spec = importlib.util.spec_from_file_location("fp8_bench", "tools/fp8_bench.py")
fp8_bench = importlib.util.module_from_spec(spec)
sys.modules["fp8_bench"] = fp8_bench  # dataclasses look their module up there
spec.loader.exec_module(fp8_bench)


def test_gemm_shapes_match_the_38b_preset_per_tp_rank():
    from megatron_r1v3.presets import r1v3_38b

    m = r1v3_38b()
    v, lm = m.vision, m.language
    for tp in (1, 2, 4, 8):
        g = {x.name: x for x in fp8_bench.r1v3_gemms(tp)}
        assert g["vit.qkv"].n * tp == 3 * v.padded_heads * v.head_dim and g["vit.fc1"].n * tp == v.ffn_hidden_size
        assert g["connector.fc1"].k == v.hidden_size * 4 and g["connector.fc2"].n == lm.hidden_size
        assert g["decoder.qkv"].n * tp == (lm.num_heads + 2 * lm.num_kv_heads) * lm.head_dim
        assert g["decoder.fc1"].n * tp == 2 * lm.ffn_hidden_size and g["decoder.fc2"].k * tp == lm.ffn_hidden_size


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_clearly_on_cpu():
    out = subprocess.run([sys.executable, "tools/fp8_bench.py"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr
