"""tools/gpu_check.py: refuses cleanly where it cannot measure, and its whole code path (SFT steps, GRPO step,
memory prediction, the IPC bucket round trip, JSON) runs on CPU with the tiny model before any GPU minute is spent."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "tools/gpu_check.py", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_refuses_without_a_gpu_naming_what_is_missing(tmp_path):
    out = _run("--out", str(tmp_path / "run"))
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA GPU is visible" in out.stderr and "--cpu-smoke" in out.stderr
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_missing_libraries_are_named(monkeypatch):
    sys.path.insert(0, str(ROOT))
    from tools import gpu_check

    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda n: None if n == "omegaconf" else real(n))
    assert gpu_check.missing_requirements(cpu_smoke=True) == ["omegaconf is not installed"]


def test_cpu_smoke_runs_every_section(tmp_path):
    out = _run("--cpu-smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == {"setup", "sft", "grpo", "memory", "fp8", "ipc", "result"}
    assert report["ipc"][0]["roundtrip_ok"] and report["ipc"][0]["refused_cpu"]
    assert report["sft"][-1]["summary"]["loss_falls"] and report["grpo"][0]["update_ok"]
    assert report["memory"][0]["predicted_gib"] > 0 and report["result"][0]["ok"]
    assert "[sft] step 1:" in out.stdout  # rows are printed as they are measured
