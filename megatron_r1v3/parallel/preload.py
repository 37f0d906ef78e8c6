"""What the ranks of `spawn.run_distributed` import, imported once by the forkserver they fork from.

torch always; on a CPU-only torch build also the CPU shim and megatron-core (the shim must precede megatron-core's
import, and applying it asks torch whether CUDA exists, which a CUDA build must not do in a process that forks
ranks). Nothing here computes, opens a process group or touches a device."""

import torch

if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
    from megatron_r1v3.parallel import quiet_notices
    from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim

    quiet_notices(on_cpu=True)
    apply_cpu_shim()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401
