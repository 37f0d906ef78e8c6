"""megatron_r1v3: 3D-parallel training of Skywork-R1V3-style vision-language reasoners.

Importing the package has no side effects: entry points call `megatron_r1v3.parallel.setup_process()` (the CPU
shim for megatron-core and warning filters) before anything imports megatron-core. docs/design.md has the layers.
"""

__version__ = "0.1.0"
