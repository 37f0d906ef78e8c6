"""The sbatch scripts on a real one-node Slurm cluster (Debian's slurm-wlm + munge, started here): an array-job
scaling sweep, and SFT and GRPO runs that are preempted with SIGUSR1, checkpoint, requeue themselves and resume to
the end."""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed (`make slurm-deps` installs Debian's slurm-wlm + munge; needs root)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster runs slurmd/slurmctld as root")
    state = tmp_path_factory.mktemp("slurm")
    out = subprocess.run([str(REPO / "slurm/testcluster/start.sh"), str(state)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr + (state / "log").joinpath("slurmctld.log").read_text()[-2000:]
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run([str(REPO / "slurm/testcluster/stop.sh"), str(state)], timeout=60)


def sbatch(env, *args) -> str:
    (REPO / "logs").mkdir(exist_ok=True)
    out = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def fresh_run(env: dict, tmp_path: Path) -> tuple[dict, Path]:
    """A run directory of this test's own (job ids restart with every test cluster, so the default
    runs/<name>-<id> and logs/<name>-<id>.out of an earlier session would be appended to and resumed from)."""
    run_dir = tmp_path / "run"
    return {**env, "R1V3_RUN_DIR": str(run_dir)}, run_dir


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True, timeout=30).stdout
    states = re.findall(r"JobState=(\S+)", out)
    return states[0] if states else "UNKNOWN"


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def read(path: Path) -> str:
    """The job log; a failed step fails the test at once (instead of waiting out the timeout)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    if "srun: error" in text or "Traceback" in text or "Killing non-startable" in text:
        raise AssertionError(f"{path} shows a failure:\n{text[-3000:]}")
    return text


def test_scaling_sweep_array_job(slurm, tmp_path):
    layouts = tmp_path / "layouts.txt"
    layouts.write_text("parallel.tensor=2 parallel.pipeline=1\nparallel.tensor=1 parallel.pipeline=2\n")
    job = sbatch(slurm, "--array=0-1", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00",
                 f"--output={tmp_path}/%x-%A_%a.out", "slurm/scaling_sweep.sbatch", "examples/tiny_cpu_parallel.yaml",
                 layouts, "demo.steps=1")
    logs = [tmp_path / f"r1v3-sweep-{job}_{i}.out" for i in (0, 1)]
    wait_for(lambda: all("step 1/1" in read(p) for p in logs), 300, f"both array tasks of job {job}")
    assert "TP2·PP1·DP1" in read(logs[0]) and "TP1·PP2·DP1" in read(logs[1])


def test_sft_preempted_by_usr1_checkpoints_requeues_and_resumes(slurm, tmp_path):
    env, run_dir = fresh_run(slurm, tmp_path)
    job = sbatch(env, "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:20:00", f"--output={tmp_path}/%x-%j.out",
                 "slurm/sft.sbatch",
                 "examples/tiny_cpu_sft.yaml", f"data.toy_dir={tmp_path}/toy", "data.toy_train=96", "train.steps=30",
                 "checkpoint.save_every=10", "train.log_every=1", "train.eval_every=0", "train.heldout_samples=0")
    log = tmp_path / f"r1v3-sft-{job}.out"
    wait_for(lambda: "[sft] step 4 " in read(log), 300, "the first training steps")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
    wait_for(lambda: "requeueing job" in read(log), 180, "the requeue")
    wait_for(lambda: job_state(env, job) == "COMPLETED", 400, f"job {job} to complete", poll=2)
    text = log.read_text(errors="replace")  # the requeue cancel line is expected here
    step = int(re.search(r"preemption signal: checkpointing step (\d+)", text).group(1))
    assert step >= 4 and "restart 1" in text
    assert f"starting at step {step}" in text and "[sft] done: 30 steps" in text
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000030"
    assert not (run_dir / "PREEMPTED").exists()


def test_grpo_preempted_by_usr1_resumes_with_its_buffer(slurm, tmp_path):
    venv = REPO / ".venv-vllm"
    if not (venv / "bin" / "r1v3").exists():
        pytest.skip("the vLLM venv is missing (make vllm-venv)")
    env, run_dir = fresh_run({**slurm, "R1V3_VENV": str(venv)}, tmp_path)
    job = sbatch(env, "--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:20:00", f"--output={tmp_path}/%x-%j.out",
                 "slurm/grpo.sbatch",
                 "examples/tiny_cpu_rl.yaml", f"data.toy_dir={tmp_path}/toy", "data.toy_train=64", "data.toy_val=8",
                 "train.steps=10", "rl.prompts_per_step=4", "rl.samples_per_prompt=4", "rl.eval_every=0",
                 "rl.eval_prompts=4", "rl.eval_samples=2", "checkpoint.save_every=0", "logging.progress=false")
    log = tmp_path / f"r1v3-grpo-{job}.out"
    wait_for(lambda: "[rl] step 2 " in read(log), 300, "the first GRPO steps")
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
    wait_for(lambda: "requeueing job" in read(log), 180, "the requeue")
    wait_for(lambda: job_state(env, job) == "COMPLETED", 400, f"job {job} to complete", poll=2)
    text = log.read_text(errors="replace")
    step = int(re.search(r"preemption signal: checkpointing step (\d+)", text).group(1))
    assert step >= 2 and "restart 1" in text
    assert f"starting at step {step}" in text and "[rl] done: 10 steps" in text
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_00000010"
