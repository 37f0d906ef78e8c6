"""SFT trainer on the tiny VLM through real megatron-core (TP2, gloo): kill -9 resume bit for bit (at a fixed and at a
random step), crash during a checkpoint save, bad samples that never stop the run; jobs that end cleanly: a finished
run started again changes nothing, ranks end with a killed launcher, and unusable checkpoints stop every rank with
an error naming the file. Learning: tests/rollout/test_grpo.py::test_cold_start_sft_learns (the GRPO tests' start-up
SFT); connector-only freezing: tests/test_recipes_38b.py (the 38B connector-only recipe at its PP2 layout)."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess


def sft_cmd(out: Path, toy: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_r1v3.cli", "sft", "examples/tiny_cpu_sft.yaml", f"output_dir={out}",
            f"data.toy_dir={toy}", "data.toy_train=96", "train.steps=12", "checkpoint.save_every=4",
            "checkpoint.keep_last=3", "train.log_every=1", "train.eval_every=0", "logging.tensorboard=false",
            "train.heldout_samples=8", *extra]  # held-out greedy answers: 8 (one batch); 32 took 15 s of a 35 s run


def run_to_end(cmd) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun puts its ranks in their own sessions, so a
    process-group kill would leave them running)."""
    root = psutil.Process(pid)
    for p in [*root.children(recursive=True), root]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def run_and_kill(cmd, until) -> None:
    """Start the run and SIGKILL its whole process tree when `until(line)` says so."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in proc.stdout:
            if until(line):
                kill_tree(proc.pid)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def losses(out: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (before a kill and after resume) keeps its last value."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["group"] == "sft"}


TIMINGS = {"tokens_per_s", "images_per_s"}


def metrics(out: Path) -> dict[tuple[str, int], dict]:
    """(group, step) -> every logged value but throughput; a step logged twice keeps its last row."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {(r["group"], r["step"]): {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """path -> (mtime in ns, size) of `root` and everything under it."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # a killed rank stays a zombie when nobody reaps it
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    run_to_end(sft_cmd(root / "ref", root / "toy"))
    ref = losses(root / "ref")
    assert sorted(ref) == list(range(1, 13))
    return root, ref


def test_kill9_during_training_then_during_a_save_then_resume_is_bit_exact(reference):
    """One run killed twice: mid-training after step 6 (the step-4 checkpoint is the latest), then, resumed, while
    writing step 8's checkpoint (the partial save must not become the latest); the last resume matches every step."""
    root, ref = reference
    out = root / "killed"
    run_and_kill(sft_cmd(out, root / "toy"), lambda line: line.startswith("[sft] step 6 "))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    partial = out / "checkpoints" / "step_00000008.partial"
    with open(root / "killed_in_save.txt", "w") as log:
        proc = subprocess.Popen(sft_cmd(out, root / "toy"), stdout=log, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert "starting at step 4" in (root / "killed_in_save.txt").read_text()
    assert partial.exists() and not (out / "checkpoints" / "step_00000008").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"

    stdout = run_to_end(sft_cmd(out, root / "toy"))
    assert "starting at step 4" in stdout
    assert losses(out) == ref  # exact float equality, every step
    assert not partial.exists()  # stale partial directories are cleaned on the next save


def test_bad_samples_are_skipped_counted_and_strict_mode_stops(reference, tmp_path):
    root, _ = reference
    toy = root / "toy"
    lines = (toy / "train.jsonl").read_text().splitlines()[:40]
    first = json.loads(lines[0])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = [
        json.dumps({**first, "images": ["does/not/exist.png"]}),
        json.dumps({**first, "images": [str(tmp_path / "corrupt.jpg")]}),
        "{ this is not json",
        json.dumps({**first, "response": "<think>\n" + "long " * 400 + "</think>\\boxed{1}"}),
    ]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(bad + lines) + "\n")
    common = [f"data.train=[{data}]", "data.val=[]", f"data.root={toy}", "train.steps=3", "checkpoint.save_every=0"]
    stdout = run_to_end(sft_cmd(tmp_path / "lenient", toy, *common))
    assert "skipped" in stdout and "missing" in stdout.split("skipped", 1)[1]
    strict = subprocess.run(sft_cmd(tmp_path / "strict", toy, *common, "data.strict=true"), capture_output=True,
                            text=True, timeout=600)
    # records are read before images are touched, so the malformed JSON on line 3 is what stops a strict run
    assert strict.returncode != 0 and f"r1v3 sft: error: {data}:3: bad JSON" in strict.stderr, strict.stderr[-2000:]


def test_rerun_of_a_finished_run_changes_nothing_and_raised_steps_continue(reference, tmp_path):
    root, _ = reference
    done = root / "ref"
    before = listing(done)
    t0 = time.monotonic()
    stdout = run_to_end(sft_cmd(done, root / "toy"))  # a requeued or re-submitted job
    assert f"[sft] {done} is complete: 12 steps of train.steps=12" in stdout, stdout
    assert listing(done) == before  # no checkpoint, metrics line, config, TensorBoard file or held-out answers
    print(f"\nre-run of a finished run: {time.monotonic() - t0:.1f}s")

    # more steps continue from the last checkpoint; a step directory left by a crash between its rename and
    # `latest` is replaced, a stale partial save removed at start
    more = tmp_path / "more"
    shutil.copytree(done, more)
    ckpts = more / "checkpoints"
    shutil.copytree(ckpts / "step_00000012", ckpts / "step_00000013")
    (ckpts / "step_00000013" / "left_by_a_crash").write_text("")
    (ckpts / "step_00000014.partial" / "model").mkdir(parents=True)
    stdout = run_to_end(sft_cmd(more, root / "toy", "train.steps=14", "checkpoint.save_every=1"))
    assert "starting at step 12" in stdout and "[sft] done: 14 steps" in stdout
    assert (ckpts / "latest").read_text().strip() == "step_00000014"
    assert json.loads((ckpts / "step_00000013" / "trainer_state.json").read_text())["step"] == 13
    assert not (ckpts / "step_00000013" / "left_by_a_crash").exists() and not list(ckpts.glob("*.partial"))
    assert sorted(losses(more)) == list(range(1, 15))
    assert json.loads((more / "COMPLETE").read_text()) == {"step": 14, "train_steps": 14}


def test_kill_the_whole_job_at_a_random_step_then_resume_matches_every_step(reference):
    root, _ = reference
    rng = random.Random(11)  # step 8 + 0.87 s: around step 8's checkpoint save, the data past its first epoch
    # after step `step` is logged (past the step-4 checkpoint, so the resume loads one), mid-step or mid-save
    step, delay = rng.randint(5, 11), rng.uniform(0.0, 1.0)
    out = root / "random_kill"

    def at_random_step(line: str) -> bool:
        if line.startswith(f"[sft] step {step} "):
            time.sleep(delay)
            return True
        return False

    run_and_kill(sft_cmd(out, root / "toy"), at_random_step)  # SIGKILL to the launcher and every rank at once
    stdout = run_to_end(sft_cmd(out, root / "toy"))
    resumed_at = int(stdout.split("starting at step ", 1)[1].split()[0])
    print(f"\nkilled after step {step} (+{delay:.2f}s), resumed at step {resumed_at}")
    assert resumed_at in (4, 8) and resumed_at <= step
    assert metrics(out) == metrics(root / "ref")  # every step's loss, lr, grad norm, skips; held-out accuracy
    assert (out / "heldout.jsonl").read_text() == (root / "ref" / "heldout.jsonl").read_text()


@pytest.mark.timing  # 10 s for every process to end: run on its own, away from the other lanes (Makefile)
def test_ranks_end_soon_after_their_launcher_is_killed(tmp_path):
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(sft_cmd(tmp_path / "orphans", tmp_path / "toy", "train.steps=200",
                                        "checkpoint.save_every=1"), stdout=subprocess.PIPE, stderr=err, text=True)
    everything = []
    try:
        for line in proc.stdout:  # step 2 is logged after step 1's checkpoint: the ranks' helpers run too
            if line.startswith("[sft] step 2 "):
                break
        launcher = psutil.Process(proc.pid)
        ranks, everything = launcher.children(), launcher.children(recursive=True)
        assert len(ranks) == 2 and len(everything) > 2, everything
        proc.send_signal(signal.SIGKILL)  # the launcher only (torchrun: the r1v3 command exec'ed into it)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in everything) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p.pid for p in everything if alive(p)]
        assert not left, f"alive 10 s after the launcher was killed: {left}"
        assert stderr.read_text().count("launcher (pid") == 2
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
        for p in everything:
            if alive(p):
                p.kill()


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def test_unusable_checkpoints_stop_every_rank_with_the_file_named(reference, tmp_path):
    root, _ = reference
    step = Path("checkpoints") / "step_00000012"
    broken = {  # case -> (how it is broken, overrides, what the error must say)
        "truncated_shard": (lambda d: _truncate(d / step / "model" / "__0_0.distcp"), [],
                            [f"{step}/model/__0_0.distcp is truncated", "its index needs"]),
        "truncated_optimizer": (lambda d: _truncate(d / step / "optimizer" / "params_tp1_pp0.pt"), [],
                                [f"{step}/optimizer/params_tp1_pp0.pt is unreadable", "(rank 1)"]),
        "dangling_latest": (lambda d: (d / "checkpoints" / "latest").write_text("step_00000099\n"), [],
                            ["checkpoints/latest names step_00000099, which does not exist"]),
        "other_model": (lambda d: None, ["model.language.ffn_hidden_size=384"],
                        ["holds a model of another shape", "linear_fc1.weight (4, 512, 128) in the checkpoint,"
                         " (4, 768, 128) in the model"]),
    }
    for name, (breaking, _, _) in broken.items():
        shutil.copytree(root / "ref", tmp_path / name)
        breaking(tmp_path / name)
    cases = [(str(tmp_path / name), ["train.steps=20", *overrides]) for name, (_, overrides, _) in broken.items()]
    t0 = time.monotonic()
    ranks = run_distributed("tests.sft_workers:resume_each", 2, timeout_s=300, toy=str(root / "toy"), cases=cases)
    print(f"\n{len(cases)} unusable checkpoints, one launch: {time.monotonic() - t0:.1f}s")
    for (name, (_, _, expected)), got0, got1 in zip(broken.items(), *ranks):
        assert got0["error"] == got1["error"], (name, got0, got1)  # every rank, the same error
        assert got0["type"] == "CheckpointError" and all(e in got0["error"] for e in expected), (name, got0)
        assert got0["seconds"] < 60, (name, got0)

    # through the CLI: another layout (TP1·DP2 on a TP2 run), the way to go on named, a non-zero exit
    shutil.copytree(root / "ref", tmp_path / "other_layout")
    t0 = time.monotonic()
    out = subprocess.run(sft_cmd(tmp_path / "other_layout", root / "toy", "train.steps=20", "parallel.tensor=1",
                                 "--nproc", "2"), capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    assert out.returncode == 1, out.stderr[-3000:]
    error = [x for x in out.stderr.splitlines() if x.startswith("r1v3 sft: error: ")]
    assert len(error) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert f"{step} was saved at TP2·PP1·DP1 (distributed optimizer), this run is TP1·PP1·DP2" in error[0]
    assert f"checkpoint.load={tmp_path / 'other_layout' / step} checkpoint.resume=false" in error[0]
    assert seconds < 120, seconds
