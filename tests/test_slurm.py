"""The sbatch scripts on a real one-node Slurm cluster (Debian's slurm-wlm + munge, started here): an array-job
scaling sweep, and an SFT and a GRPO job, in flight together, that are preempted with SIGUSR1, checkpoint, requeue
themselves and resume to the end."""

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


def preempt_when(env, jobs: dict[str, tuple[Path, str]], timeout: float) -> None:
    """Jobs in flight together: send each SIGUSR1 (the preemption notice) as soon as its log shows its trigger."""
    waiting = dict(jobs)
    deadline = time.monotonic() + timeout
    while waiting:
        for job, (log, trigger) in list(waiting.items()):
            if trigger in read(log):
                subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True, timeout=30)
                del waiting[job]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {sorted(waiting.values())}")
        time.sleep(0.5)


def check_resumed(log: Path, run_dir: Path, kind: str, first: int, steps: int) -> None:
    text = log.read_text(errors="replace")  # the requeue cancel line is expected here
    step = int(re.search(r"preemption signal: checkpointing step (\d+)", text).group(1))
    assert step >= first and "restart 1" in text, text[-3000:]
    assert f"starting at step {step}" in text and f"[{kind}] done: {steps} steps" in text, text[-3000:]
    assert (run_dir / "checkpoints/latest").read_text().strip() == f"step_{steps:08d}"
    assert not (run_dir / "PREEMPTED").exists()


def test_sft_and_grpo_preempted_by_usr1_checkpoint_requeue_and_resume(slurm, tmp_path):
    """Both jobs share the one-node cluster at once (as a user's jobs would), which also overlaps their start-ups
    and requeue waits: SFT from the tiny recipe, GRPO with its vLLM engine and sample buffer (without the vLLM venv
    the SFT job still runs, then the test reports the GRPO half as skipped)."""
    venv = REPO / ".venv-vllm"
    with_grpo = (venv / "bin" / "r1v3").exists()
    sft_env, sft_dir = fresh_run(slurm, tmp_path / "sft")
    grpo_env, grpo_dir = fresh_run({**slurm, "R1V3_VENV": str(venv)}, tmp_path / "grpo")
    common = ["--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:20:00", f"--output={tmp_path}/%x-%j.out"]
    sft = sbatch(sft_env, *common, "slurm/sft.sbatch",
                 "examples/tiny_cpu_sft.yaml", f"data.toy_dir={tmp_path}/sft_toy", "data.toy_train=96",
                 "train.steps=30", "checkpoint.save_every=10", "train.log_every=1", "train.eval_every=0",
                 "train.heldout_samples=0")
    jobs = {sft: (tmp_path / f"r1v3-sft-{sft}.out", "[sft] step 4 ")}
    if with_grpo:
        grpo = sbatch(grpo_env, *common, "slurm/grpo.sbatch",
                      "examples/tiny_cpu_rl.yaml", f"data.toy_dir={tmp_path}/grpo_toy", "data.toy_train=64",
                      "data.toy_val=8", "train.steps=10", "rl.prompts_per_step=4", "rl.samples_per_prompt=4",
                      "rl.eval_every=0", "rl.eval_prompts=4", "rl.eval_samples=2", "checkpoint.save_every=0",
                      "logging.progress=false")
        jobs[grpo] = (tmp_path / f"r1v3-grpo-{grpo}.out", "[rl] step 2 ")
    preempt_when(slurm, jobs, 400)
    for job, (log, _) in jobs.items():
        wait_for(lambda log=log: "requeueing job" in read(log), 180, f"job {job}'s requeue")
    for job in jobs:
        wait_for(lambda job=job: job_state(slurm, job) == "COMPLETED", 500, f"job {job} to complete", poll=2)
    check_resumed(jobs[sft][0], sft_dir, "sft", 4, 30)
    if not with_grpo:
        pytest.skip("the SFT job passed; the GRPO job needs the vLLM venv (make vllm-venv)")
    check_resumed(jobs[grpo][0], grpo_dir, "rl", 2, 10)
