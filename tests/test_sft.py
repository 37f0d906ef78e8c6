"""SFT trainer on the tiny VLM through real megatron-core (TP2, gloo): learning, connector-only freezing, kill -9
resume bit for bit, crash during a checkpoint save, and bad samples that never stop the run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_r1v3.parallel.spawn import run_distributed

pytestmark = pytest.mark.multiprocess


def test_sft_learns_and_connector_only_touches_only_the_connector(tmp_path):
    r = run_distributed("tests.sft_workers:sft_then_connector_only", 2, timeout_s=900, workdir=str(tmp_path))[0]
    losses = r["losses"]
    assert losses[-1] <= 0.5 * losses[0], losses[::25]
    assert r["well_formed"] >= 0.9, r["examples"]
    assert r["changed_outside_connector"] == []
    assert r["connector_changed"] == r["connector_params"] and len(r["connector_params"]) == 6


def sft_cmd(out: Path, toy: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megatron_r1v3.cli", "sft", "examples/tiny_cpu_sft.yaml", f"output_dir={out}",
            f"data.toy_dir={toy}", "data.toy_train=96", "train.steps=12", "checkpoint.save_every=4",
            "checkpoint.keep_last=3", "train.log_every=1", "train.eval_every=0", "logging.tensorboard=false", *extra]


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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    run_to_end(sft_cmd(root / "ref", root / "toy"))
    ref = losses(root / "ref")
    assert sorted(ref) == list(range(1, 13))
    return root, ref


def test_kill9_during_training_then_resume_is_bit_exact(reference):
    root, ref = reference
    out = root / "killed"
    run_and_kill(sft_cmd(out, root / "toy"), lambda line: line.startswith("[sft] step 6 "))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    stdout = run_to_end(sft_cmd(out, root / "toy"))
    assert "starting at step 4" in stdout
    assert losses(out) == ref  # exact float equality, every step


def test_kill9_during_checkpoint_save_keeps_previous_latest(reference):
    root, ref = reference
    out = root / "killed_in_save"
    partial = out / "checkpoints" / "step_00000008.partial"
    proc = subprocess.Popen(sft_cmd(out, root / "toy"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert partial.exists() and not (out / "checkpoints" / "step_00000008").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    stdout = run_to_end(sft_cmd(out, root / "toy"))
    assert "starting at step 4" in stdout and losses(out) == ref
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
