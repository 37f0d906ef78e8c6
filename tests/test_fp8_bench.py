"""tools/fp8_bench.py: the GEMM shapes it measures are the model's, and it refuses clearly without a GPU."""

import importlib.util
import json
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


def test_without_te_bf16_and_fp8_are_torch_mm_and_scaled_mm_of_the_same_gemm():
    """The fallback pair computes the same product (E4M3 rounding apart); runs on CPU too."""
    torch.manual_seed(0)
    bf16, fp8 = fp8_bench.gemm_fns(fp8_bench.Gemm("t", 64, 48), 32, te=None, device="cpu")
    a, b = bf16(), fp8()
    assert a.shape == b.shape == (32, 48) and a.dtype == b.dtype == torch.bfloat16
    assert (a.float() - b.float()).norm() / a.float().norm() < 0.1


def test_with_te_bf16_and_fp8_run_the_same_te_linear(monkeypatch):
    """BF16 and FP8 go through one `te.Linear`; FP8 is the same call under `fp8_autocast` (TE faked on CPU)."""
    import contextlib

    calls, layers = [], []

    class Linear:
        def __init__(self, k, n, bias, params_dtype, device):
            layers.append((k, n, bias, params_dtype))

        def __call__(self, x):
            calls.append((len(layers), fake.fp8))
            return x

    @contextlib.contextmanager
    def fp8_autocast(enabled, fp8_recipe):
        assert fp8_recipe == "recipe"
        fake.fp8 = enabled
        yield
        fake.fp8 = False

    fake = type("te", (), {"Linear": Linear, "fp8_autocast": staticmethod(fp8_autocast), "fp8": False})
    monkeypatch.setattr(fp8_bench, "_te_recipe", lambda: "recipe")
    bf16, fp8 = fp8_bench.gemm_fns(fp8_bench.Gemm("t", 64, 48), 32, te=fake, device="cpu")
    bf16()
    fp8()
    assert layers == [(64, 48, False, torch.bfloat16)] and calls == [(1, False), (1, True)]


def test_table_row_keeps_its_format_and_json_has_the_numbers():
    g = fp8_bench.Gemm("decoder.fc2", 27648, 5120)
    flops = 2 * 8192 * g.k * g.n
    row = fp8_bench.gemm_row(2, g, 8192, flops / 500e12, flops / 1000e12, {"bf16": 1000.0, "fp8": 2000.0})
    assert fp8_bench.format_gemm_row(row) == "| 2 | decoder.fc2 | 27648 | 5120 | 500 | 50% | 1000 | 50% | 2.00x |"
    assert row["bf16_tflops"] == pytest.approx(500) and row["fp8_speedup"] == pytest.approx(2)
    assert {"tp", "gemm", "m", "k", "n", "bf16_s", "fp8_s", "bf16_mfu", "fp8_mfu"} <= set(row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_on_cpu_before_writing_anything(tmp_path):
    out = subprocess.run([sys.executable, "tools/fp8_bench.py", "--json", str(tmp_path / "r.json"), "--markdown",
                          str(tmp_path / "r.md")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA GPU" in out.stderr and out.stdout == ""
    assert not list(tmp_path.iterdir())


def test_main_prints_rows_as_measured_and_writes_json_and_markdown(monkeypatch, capsys, tmp_path):
    """The whole report path with the GPU parts faked: rows are on stdout before the decoder layer starts, a failing
    layer is reported without losing the table, and --json / --markdown hold what was printed."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(fp8_bench, "_te", lambda: None)
    monkeypatch.setattr(fp8_bench, "bench_gemm", lambda g, m, te: (2e-3, 1e-3))
    seen_before_layer = []

    def layer(seq, mb, fp8):
        seen_before_layer.append(capsys.readouterr().out)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fp8_bench, "bench_decoder_layer", layer)
    js, md = tmp_path / "r.json", tmp_path / "r.md"
    monkeypatch.setattr(sys, "argv", ["fp8_bench.py", "--tp", "1", "--json", str(js), "--markdown", str(md)])
    assert fp8_bench.main() == 1
    rest = capsys.readouterr().out
    assert seen_before_layer and seen_before_layer[0].count("| 1 | ") == 10 and "torch.mm" in seen_before_layer[0]
    assert "decoder layer BF16: failed (OutOfMemoryError" in rest and "needs Transformer Engine" in rest
    assert md.read_text() == seen_before_layer[0] + rest
    report = json.loads(js.read_text())
    assert report["device"] == "NVIDIA H200" and len(report["gemms"]) == 10
    assert report["gemms"][0]["fp8_speedup"] == pytest.approx(2.0)
    assert report["decoder_layer"][0]["error"].startswith("OutOfMemoryError")
    assert report["decoder_layer"][1]["skipped"] == "needs Transformer Engine"
