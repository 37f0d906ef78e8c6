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


_RANK = """
import os, sys, time
from megatron_r1v3.parallel import lifeline
lifeline.watch_launcher(poll_s=3600)  # the poll never comes round: only the excepthook can end this rank
import torch.distributed as dist
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)  # wraps the hook
print("ready", flush=True)
launcher = int(os.environ["R1V3_LAUNCHER_PID"])
while os.getppid() == launcher:
    time.sleep(0.05)
raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\\nmore of gloo's text")
"""

_LAUNCHER = """
import os, subprocess, sys
env = {**os.environ, "R1V3_LAUNCHER_PID": str(os.getpid()), "RANK": "0", "WORLD_SIZE": "1"}
rank = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env, stdout=subprocess.PIPE,
                        text=True, start_new_session=True)
assert rank.stdout.readline() == "ready\\n"
print(os.getpid(), flush=True)  # and exit: the rank is orphaned, then fails as a rank whose peer ended does
"""


def test_a_rank_that_fails_after_its_launcher_is_gone_ends_saying_why(tmp_path):
    """CI: rank 0's watch fired first and ended it; rank 1's collective failed at once and it printed a peer's
    traceback (no word on the cause) before its own watch polled. Its error now ends it the watch's way, named."""
    out = subprocess.run([sys.executable, "-c", _LAUNCHER, _RANK, str(tmp_path / "store")], capture_output=True,
                         text=True, timeout=120)  # returns once the rank closed stderr too: it has ended
    assert out.returncode == 0, out.stderr
    launcher = out.stdout.strip()
    assert out.stderr == (f"[r1v3] rank 0: launcher (pid {launcher}) is gone; ending this rank and its helper "
                          "processes (its own error, likely from a peer rank that ended with the launcher: "
                          "RuntimeError: Connection closed by peer [127.0.0.1]:29500)\n")


def test_one_error_for_every_rank_names_the_problem():
    agree_on_errors(None, CheckpointError)
    with pytest.raises(CheckpointError, match=r"^x\.pt is truncated$"):
        agree_on_errors("x.pt is truncated", CheckpointError)
    with pytest.raises(CheckpointError, match=r"^OSError: disk gone$") as err:
        agree_on_errors(OSError("disk gone"), CheckpointError)
    assert isinstance(err.value.__cause__, OSError)
