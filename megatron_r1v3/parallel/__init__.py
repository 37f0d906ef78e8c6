"""Process groups and megatron-core parallel state; importing this package installs the CPU shim when CUDA is absent.

Every module that imports megatron-core imports this package first, so the shim is in place before megatron-core
binds any CUDA call (it is a no-op on GPU machines).
"""

import warnings

from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim

if apply_cpu_shim():  # expected on CPU machines; not worth a screenful per process
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex are|is) not installed.*")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from megatron_r1v3.parallel.init import (  # noqa: E402
    ParallelState,
    destroy_parallel,
    init_parallel,
    set_model_parallel,
    te_available,
)

__all__ = ["ParallelState", "apply_cpu_shim", "destroy_parallel", "init_parallel", "set_model_parallel", "te_available"]
