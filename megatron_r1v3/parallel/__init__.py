"""Process set-up, the parallel layout and megatron-core's process groups.

Importing this package changes nothing. Entry points (the `r1v3` CLI, the test launcher's workers, the tools) call
`setup_process()` first: it installs the CPU shim when CUDA is absent, so megatron-core's hard-coded CUDA calls run
on CPU/gloo, silences megatron's known benign notices, and makes a rank of a launcher (torchrun, srun, the test
launcher) end with it (`lifeline.py`). `init_parallel` calls it too, for library users.
megatron-core itself is imported only when a process-group helper is first used.
"""

import warnings

# Known, benign notices megatron-core prints once per process; silenced so real warnings stay visible.
_BENIGN = [
    ".*The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",  # megatron zero_grad helper
    "`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",  # megatron's c10d calls
    "full scope is deprecated",
    "`torch.jit.script_method` is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",  # torch DCP inside dist_checkpointing
]
_CPU_ONLY = [".*(Transformer Engine and Apex are|Apex is) not installed", "When using async grad allreduce"]


def setup_process() -> bool:
    """Warning filters + the CPU shim (a no-op with CUDA) + the launcher watch of a rank. Idempotent; returns whether
    the shim is active. Call it before megatron-core is imported."""
    from megatron_r1v3.parallel.lifeline import start_resource_tracker, watch_launcher

    watch_launcher()  # first: before the seconds of imports below
    start_resource_tracker()
    import torch

    from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim

    quiet_notices(on_cpu=not torch.cuda.is_available())
    return apply_cpu_shim()


def quiet_notices(on_cpu: bool) -> None:
    """Silence megatron-core's known benign notices (on CPU also its expected fallbacks and GPU-only advice)."""
    for pattern in _BENIGN + (_CPU_ONLY if on_cpu else []):
        warnings.filterwarnings("ignore", message=pattern)


_INIT_NAMES = ("ParallelState", "compute_device", "current_layout", "destroy_parallel", "init_parallel",
               "set_model_parallel", "te_available")


def __getattr__(name: str):
    """Process-group helpers load torch (and megatron-core) on first use, so config tools start without them."""
    if name in _INIT_NAMES:
        from megatron_r1v3.parallel import init

        return getattr(init, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["quiet_notices", "setup_process", *_INIT_NAMES]
