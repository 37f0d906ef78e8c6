"""megatron_r1v3: 3D-parallel training of Skywork-R1V3-style vision-language reasoners."""

__version__ = "0.1.0"
