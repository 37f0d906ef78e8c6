"""`R1V3_REQUIRE`: without it a missing component skips; with it, that skip fails the run, naming the component,
while skips for other reasons (and for components not required) stay skips. Two small pytest runs in a subprocess
with this repository's conftest as a plugin."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import missing_components, required_components

REPO = Path(__file__).resolve().parents[1]

TESTS = '''
import pytest

@pytest.fixture
def cluster():
    pytest.skip("Slurm is not installed (`make slurm-deps`)")

def test_slurm(cluster):
    pass

@pytest.mark.skipif(True, reason="vLLM not importable (ImportError: no module named vllm)")
def test_vllm():
    pass

def test_dali():
    pytest.skip("could not import 'nvidia.dali': No module named 'nvidia'")

@pytest.mark.skipif(True, reason="checks the CPU config")
def test_unrelated():
    pass

def test_runs():
    pass
'''
MODULE_LEVEL = '''
import pytest
pytest.importorskip("nvidia.dali.not_here")

def test_never():
    pass
'''


def _run(tmp_path: Path, require: str | None) -> tuple[int, dict[str, str], str]:
    (tmp_path / "test_components.py").write_text(TESTS)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)
    env = {k: v for k, v in os.environ.items() if k != "R1V3_REQUIRE"}
    if require is not None:
        env["R1V3_REQUIRE"] = require
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.conftest", "-v", "-rs", "-p", "no:cacheprovider",
                          "--continue-on-collection-errors", str(tmp_path)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    outcomes = dict(re.findall(r"::(test_\w+) (PASSED|SKIPPED|FAILED|ERROR)", out.stdout))
    if "test_module_level.py:3: could not import" in out.stdout:  # a module-level skip has no test line
        outcomes["test_module_level"] = "SKIPPED"
    if "ERROR collecting" in out.stdout and "test_module_level.py" in out.stdout:
        outcomes["test_module_level"] = "ERROR"
    return out.returncode, outcomes, out.stdout + out.stderr


def test_without_the_switch_missing_components_skip(tmp_path):
    code, outcomes, text = _run(tmp_path, None)
    assert code == 0, text
    assert outcomes == {"test_slurm": "SKIPPED", "test_vllm": "SKIPPED", "test_dali": "SKIPPED",
                        "test_unrelated": "SKIPPED", "test_runs": "PASSED", "test_module_level": "SKIPPED"}, text


def test_with_the_switch_a_missing_required_component_fails(tmp_path):
    code, outcomes, text = _run(tmp_path, "slurm, dali")
    assert code != 0, text
    assert outcomes == {"test_slurm": "ERROR", "test_vllm": "SKIPPED", "test_dali": "FAILED",
                        "test_unrelated": "SKIPPED", "test_runs": "PASSED", "test_module_level": "ERROR"}, text
    assert "R1V3_REQUIRE=slurm, dali requires slurm, but the test was skipped: Skipped: Slurm is not installed" in text
    assert "requires dali, but the test was skipped" in text


def test_component_names_are_checked():
    assert required_components(None) == set() and required_components(" vllm,DALI ,") == {"vllm", "dali"}
    with pytest.raises(ValueError, match=r"R1V3_REQUIRE: unknown component\(s\) \['gpu'\]"):
        required_components("vllm,gpu")
    assert missing_components("the vLLM venv is missing (make vllm-venv)") == {"vllm"}
    assert missing_components("the test cluster runs slurmd/slurmctld as root") == {"slurm"}
    assert missing_components("checks the CPU config") == set()
