"""Process groups and megatron-core parallel state; importing this package installs the CPU shim when CUDA is absent.

Every module that imports megatron-core imports this package first, so the shim is in place before megatron-core
binds any CUDA call (it is a no-op on GPU machines). megatron-core itself is imported only when a process-group
helper is first used.
"""

import warnings

import torch

# Known, benign notices megatron-core prints once per process; silenced so real warnings stay visible.
_BENIGN = [
    ".*The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",  # megatron zero_grad helper
    "`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",  # megatron's c10d calls
    "full scope is deprecated",
    "`torch.jit.script_method` is deprecated",
    "Please use DTensor instead and we are deprecating ShardedTensor",  # torch DCP inside dist_checkpointing
]
if not torch.cuda.is_available():  # expected fallbacks on CPU machines; GPU-only advice
    _BENIGN += [".*(Transformer Engine and Apex are|Apex is) not installed", "When using async grad allreduce"]
for _pattern in _BENIGN:
    warnings.filterwarnings("ignore", message=_pattern)

from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim  # noqa: E402

apply_cpu_shim()

_INIT_NAMES = ("ParallelState", "destroy_parallel", "init_parallel", "set_model_parallel", "te_available")


def __getattr__(name: str):
    """Process-group helpers load megatron-core on first use, so config/conversion tools start without it."""
    if name in _INIT_NAMES:
        from megatron_r1v3.parallel import init

        return getattr(init, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["apply_cpu_shim", *_INIT_NAMES]
