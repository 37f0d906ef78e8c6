"""What the ranks of `spawn.run_distributed` import, imported once by the forkserver they fork from.

torch always; on a CPU-only torch build also the CPU shim, megatron-core and, where it is installed (the vLLM
venv), vLLM's `LLM` (its imports are ~8 s of a rank's start on the 2-core box). The shim must precede megatron-core's
import, and applying it asks torch whether CUDA exists, which a CUDA build must not do in a process that forks
ranks. Nothing here computes, opens a process group or touches a device. vLLM sets a few environment variables
when imported (`vllm.env_override`); `IMPORT_ENV` keeps them for the ranks, which otherwise start from their
launcher's environment."""

import importlib.util
import os

import torch

IMPORT_ENV: dict[str, str] = {}

if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
    from megatron_r1v3.parallel import quiet_notices
    from megatron_r1v3.parallel.cpu_shim import apply_cpu_shim

    quiet_notices(on_cpu=True)
    apply_cpu_shim()
    import megatron.core.dist_checkpointing  # noqa: F401
    import megatron.core.models.gpt  # noqa: F401
    import megatron.core.optimizer  # noqa: F401
    import megatron.core.pipeline_parallel  # noqa: F401

    if importlib.util.find_spec("vllm") is not None:
        _before = dict(os.environ)
        from vllm import LLM  # noqa: F401

        IMPORT_ENV = {k: v for k, v in os.environ.items() if _before.get(k) != v}
