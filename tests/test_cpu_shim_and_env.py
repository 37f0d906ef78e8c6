"""The CPU shim (only active without CUDA) and launcher-environment detection."""

import pytest
import torch

from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim, shim_applied
from megatron_r1v3.parallel.env import detect_launch_env, first_host, under_launcher

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is for machines without CUDA")


def test_shim_active_and_idempotent():
    assert shim_applied() and apply_cpu_shim()


def test_cuda_allocations_land_on_cpu():
    assert torch.cuda.current_device() == 0
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).new_zeros(3, device="cuda:0").device.type == "cpu"
    assert torch.ones(2).to(torch.float64).dtype == torch.float64  # dtype-only .to untouched
    torch.cuda.synchronize()
    with torch.cuda.stream(torch.cuda.Stream()):
        pass


def test_tensor_type_reports_cuda_for_megatron_asserts():
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_rng_tracker_forks_cpu_generator_reproducibly():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        a = torch.randn(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    torch.manual_seed(123)
    assert torch.equal(a, torch.randn(4))  # fork == a fresh generator seeded 123
    with tracker.fork("model-parallel-rng"):
        b = torch.randn(4)
    assert not torch.equal(a, b)  # the forked stream advanced


def test_first_host_of_slurm_nodelists():
    assert first_host("gpu-[03-05,09],cpu1") == "gpu-03"
    assert first_host("node7") == "node7"
    assert first_host("h100-a[12,14]") == "h100-a12"


def test_detect_launch_env_torchrun_slurm_and_single():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    e = detect_launch_env(env=torchrun)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.master_port, e.launcher) == (
        3, 8, 3, "n1", 1234, "torchrun")
    slurm = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "16",
             "SLURM_JOB_NODELIST": "h100-[07-08]", "SLURM_JOB_ID": "4242"}
    e = detect_launch_env(env=slurm)
    assert (e.rank, e.world_size, e.local_rank, e.master_addr, e.launcher) == (9, 16, 1, "h100-07", "slurm")
    assert e.master_port == 20000 + 4242
    batch_script = {k: v for k, v in slurm.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert under_launcher(batch_script) is None  # the batch script itself must still call srun/torchrun
    assert detect_launch_env(env={}).world_size == 1
    with pytest.raises(RuntimeError, match="SLURM_JOB_NODELIST"):
        detect_launch_env("slurm", env={"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})


def test_default_device_context_still_applies_to_wrapped_factories():
    # transformers' from_pretrained builds under torch.device("meta"); if the shim's wrappers broke that, loaded
    # models would silently get uninitialised non-persistent buffers (e.g. rotary inv_freq).
    with torch.device("meta"):
        assert torch.arange(3).device.type == "meta"
        assert torch.empty(2, 2).device.type == "meta"
        assert torch.zeros(2).device.type == "meta"


def test_megatron_jit_fuser_is_a_no_op_under_the_shim_and_dynamo_stays_unimported():
    """CPU runs leave megatron's fusions off; decorating them with torch.compile only imported dynamo + inductor
    (2 of a rank's 3.5 s of imports). A fresh process: the shim first, then megatron-core as a rank imports it."""
    import subprocess
    import sys

    probe = ("import sys\nfrom megatron_r1v3.parallel import setup_process\nsetup_process()\n"
             "import megatron.core\nfrom megatron.core import jit\nfrom megatron_r1v3.sft import trainer\n"
             "print(jit.jit_fuser is jit.noop_decorator, 'torch._dynamo' in sys.modules,"
             " 'torch._inductor' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False", "False"], out.stdout
