"""The test process is an entry point like the CLI: set it up (CPU shim for megatron-core, warning filters) before
any test module imports megatron-core. Spawned ranks do the same in `parallel.spawn`."""

from megatron_r1v3.parallel import setup_process

setup_process()
