"""megatron_r1v3: 3D-parallel training of Skywork-R1V3-style vision-language reasoners.

Importing any `megatron_r1v3` module first runs this file, which installs the CPU shim for megatron-core (a no-op
when CUDA is present) and silences megatron's known benign notices — before any megatron-core import, whatever
the import order inside the submodules.
"""

__version__ = "0.1.0"

import megatron_r1v3.parallel  # noqa: E402,F401  (warning filters + CPU shim; see parallel/__init__.py)
