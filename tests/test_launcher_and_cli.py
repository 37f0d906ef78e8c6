"""Multi-process failures are reported with rank and phase (never a hang); the `r1v3` CLI end to end."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_r1v3.parallel.spawn import DistributedFailure, DistributedTimeout, run_distributed

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timing
def test_hung_rank_times_out_naming_rank_and_phase():
    t0 = time.monotonic()
    with pytest.raises(DistributedTimeout) as err:  # ranks fork in ~0.1 s; a process's first launch ~3 s (its
        run_distributed("tests.mp_workers:hang_on_rank1", 2, timeout_s=8)  # forkserver imports megatron-core)
    assert "rank 1 in phase 'stuck before barrier'" in str(err.value)
    assert "rank 0 in phase 'waiting in barrier'" in str(err.value)
    assert time.monotonic() - t0 < 50


def test_failing_rank_is_named_with_traceback():
    with pytest.raises(DistributedFailure) as err:
        run_distributed("tests.mp_workers:raise_on_rank1", 2, timeout_s=60)
    msg = str(err.value)
    assert "rank 1 failed in phase 'about to fail'" in msg and "ValueError: deliberate failure" in msg


LAUNCHER = """
import os, sys
from megatron_r1v3.parallel.spawn import run_distributed
if __name__ == "__main__":
    run_distributed("tests.mp_workers:report_then_sleep", 1, out_dir=sys.argv[1] + "/first", seconds=0)
    os.environ["R1V3_TEST_MARK"] = "set after the first launch"  # after the forkserver started
    run_distributed("tests.mp_workers:report_then_sleep", 2, timeout_s=600, out_dir=sys.argv[1], seconds=600)
"""


@pytest.mark.timing
def test_ranks_fork_preloaded_with_the_launchers_environment_and_end_with_it(tmp_path):
    """Ranks fork from the launcher's forkserver (megatron-core imported there once, on a CPU torch), see the
    launcher's environment at the call, and end within seconds of a SIGKILL of the launcher, although their parent
    is the forkserver (which must not outlive the launcher)."""
    import json

    import psutil
    import torch

    (tmp_path / "first").mkdir()
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    launcher = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"rank{r}.json").is_file() for r in (0, 1)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
            time.sleep(0.2)
    finally:
        launcher.kill()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert json.loads((tmp_path / "first" / "rank0.json").read_text())["mark"] is None
    assert [r["mark"] for r in ranks] == ["set after the first launch"] * 2
    assert all(r["preloaded"] for r in ranks) == (torch.version.cuda is None), ranks
    t0 = time.monotonic()
    while any(psutil.pid_exists(r["pid"]) and psutil.Process(r["pid"]).status() != psutil.STATUS_ZOMBIE
              for r in ranks):
        assert time.monotonic() - t0 < 20, f"ranks {ranks} outlived their killed launcher"
        time.sleep(0.2)
    out = launcher.communicate()[0]
    assert out.count("launcher (pid") == 2, out  # each rank said why it ended


def _r1v3(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "megatron_r1v3.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_info_prints_38b_parameter_counts():
    out = _r1v3("info", "--preset", "r1v3-38b")
    assert out.returncode == 0, out.stderr
    counts = {m.group(1): int(m.group(2).replace(",", ""))
              for m in re.finditer(r"^(vision|connector|decoder|total)\S*.*?\s([\d,]{9,})\s", out.stdout, re.M)}
    expected = {"vision": 5.54e9, "connector": 92e6, "decoder": 32.76e9, "total": 38.39e9}
    for name, want in expected.items():
        assert abs(counts[name] - want) / want < 0.005, (name, counts[name])


@pytest.mark.multiprocess
def test_train_step_relaunches_under_torchrun_at_tp2_pp2():
    out = _r1v3("train-step", "examples/tiny_cpu_parallel.yaml", "demo.steps=2", "demo.num_microbatches=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "launching 4 processes" in out.stdout and "TP2·PP2·DP1" in out.stdout
    losses = [float(x) for x in re.findall(r"loss (\d+\.\d+)", out.stdout)]
    assert len(losses) == 2 and all(0 < x < 20 for x in losses)


def test_cli_config_error_names_field_and_exits_2():
    out = _r1v3("train-step", "examples/tiny_cpu_parallel.yaml", "parallel.tensor=4", "--nproc", "1")
    assert out.returncode == 2 and "num_kv_heads" in out.stderr


@pytest.mark.parametrize("command", ["sft", "rl", "train-step"])
def test_a_command_relaunching_under_torchrun_has_not_imported_torch(command):
    """The `r1v3` process execs into torchrun, which imports torch itself: importing it before (the CPU shim's
    set-up) cost 1.3 s per launch on 2 cores. Checked at the moment it would exec."""
    probe = ("import sys\nimport megatron_r1v3.cli as cli\n"
             "def at_exec(nproc, argv):\n"
             "    print('torch' in sys.modules, nproc)\n    sys.exit(0)\n"
             "cli.maybe_relaunch = at_exec\n"
             f"cli.main([{command!r}, 'examples/tiny_cpu_{'rl' if command == 'rl' else 'sft'}.yaml'])\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "2"], out.stdout
