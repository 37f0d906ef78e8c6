"""The package's layers point down (import-linter's layers contract in pyproject.toml), the check catches an upward
or sideways import (a test of the test, on a copy of the package), and importing the bottom layers has no side
effects."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(tree: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the repository's contract over the `megatron_r1v3` package found in `tree`."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())", "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120)


def test_package_layers_point_down():
    result = _lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("module, line, edge", [
    # an upward import hidden inside a function (lazy imports count)
    ("models/build.py", "def _up():\n    from megatron_r1v3.training import step  # noqa\n",
     "megatron_r1v3.models.build -> megatron_r1v3.training.step"),
    # the bottom layer importing a preset
    ("config.py", "from megatron_r1v3.presets import tiny  # noqa\n", "megatron_r1v3.config -> megatron_r1v3.presets"),
    # siblings: RL borrowing from SFT
    ("rl/grpo.py", "from megatron_r1v3.sft import trainer  # noqa\n", "megatron_r1v3.rl.grpo -> megatron_r1v3.sft"),
])
def test_lint_fails_on_an_upward_import(tmp_path, module, line, edge):
    shutil.copytree(ROOT / "megatron_r1v3", tmp_path / "megatron_r1v3",
                    ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "megatron_r1v3" / module, "a") as f:
        f.write("\n\n" + line)
    result = _lint(tmp_path)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and edge in result.stdout, result.stdout


def test_importing_the_bottom_layers_has_no_side_effects():
    code = ("import sys, megatron_r1v3, megatron_r1v3.config, megatron_r1v3.presets, megatron_r1v3.parallel, "
            "megatron_r1v3.parallel.layout; from megatron_r1v3.presets import load_config; load_config(None, []); "
            "print(sorted(m for m in ('torch', 'megatron', 'megatron_r1v3.parallel.cpu_shim') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
