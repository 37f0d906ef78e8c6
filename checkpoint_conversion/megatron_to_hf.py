#!/usr/bin/env python
"""Same as `r1v3 convert megatron-to-hf --megatron DIR --out DIR [--layout remote|native] [--tp N --pp M]`."""

import sys

from megatron_r1v3.cli import main

if __name__ == "__main__":  # dist_checkpointing spawns helpers: the guard is required
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
