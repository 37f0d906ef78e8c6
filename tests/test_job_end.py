"""The pieces of jobs that end cleanly, in one process: the checkpoints root at start (stale partial saves, a step
moved aside by a re-save, a `latest` naming nothing), how a rank finds its launcher, and one error for all ranks.
The multi-process behaviour (re-run of a finished run, killed launcher, unusable checkpoints) is in test_sft.py."""

import os
import signal
import subprocess
import sys

import pytest

from megatron_r1v3.models.weights import CheckpointError
from megatron_r1v3.parallel.agree import agree_on_errors
from megatron_r1v3.parallel.lifeline import LAUNCHER_PID, launcher_pid
from megatron_r1v3.training.resume import latest_step, remove_stale_partials


def _step(root, name, state=True):
    (root / name).mkdir()
    if state:
        (root / name / "trainer_state.json").write_text("{}")


def test_start_removes_partial_saves_and_restores_a_step_moved_aside(tmp_path):
    _step(tmp_path, "step_00000004")
    _step(tmp_path, "step_00000008.partial", state=False)  # a save killed before its rename
    _step(tmp_path, "step_00000008.replaced.partial")  # committed step 8 moved aside, killed before the new one
    _step(tmp_path, "step_00000004.replaced.partial")  # moved aside, successor in place: stale
    remove_stale_partials(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000008"]
    assert (tmp_path / "step_00000008" / "trainer_state.json").is_file()


def test_latest_names_a_complete_step_or_fails_naming_it(tmp_path):
    assert latest_step(tmp_path) is None
    _step(tmp_path, "step_00000004")
    (tmp_path / "latest").write_text("step_00000004\n")
    assert latest_step(tmp_path) == 4
    (tmp_path / "latest").write_text("step_00000012\n")
    with pytest.raises(CheckpointError, match="latest names step_00000012, which does not exist"):
        latest_step(tmp_path)
    _step(tmp_path, "step_00000012", state=False)
    with pytest.raises(CheckpointError, match="which is not a complete checkpoint"):
        latest_step(tmp_path)


def test_a_rank_finds_its_launcher_or_sees_it_gone():
    parent = os.getppid()
    assert launcher_pid({}) == parent
    assert launcher_pid({LAUNCHER_PID: str(parent)}) == parent
    assert launcher_pid({LAUNCHER_PID: str(os.getpid())}) == parent  # alive, a wrapper in between: watch the parent
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert launcher_pid({LAUNCHER_PID: str(gone.pid)}) is None  # the launcher died before the watch started


def test_a_rank_ending_says_why_while_sys_stderr_is_swapped_for_a_buffer():
    """torch.distributed's excepthook swaps sys.stderr for a StringIO while it formats a failed collective's traceback
    (the peer rank ended first); the watch kills the process right after its line, so that line must not go there."""
    code = ("import io, sys\nfrom megatron_r1v3.parallel import lifeline\n"
            "sys.stderr = io.StringIO()\nlifeline._end_rank(4242)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "RANK": "3"}, start_new_session=True)  # it kills its process group
    assert out.returncode == -signal.SIGKILL
    assert out.stderr == ("[r1v3] rank 3: launcher (pid 4242) is gone; ending this rank and its helper processes\n")


def test_one_error_for_every_rank_names_the_problem():
    agree_on_errors(None, CheckpointError)
    with pytest.raises(CheckpointError, match=r"^x\.pt is truncated$"):
        agree_on_errors("x.pt is truncated", CheckpointError)
    with pytest.raises(CheckpointError, match=r"^OSError: disk gone$") as err:
        agree_on_errors(OSError("disk gone"), CheckpointError)
    assert isinstance(err.value.__cause__, OSError)
