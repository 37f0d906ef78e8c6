#!/usr/bin/env python
"""Same as `r1v3 convert hf-to-megatron --hf DIR --out DIR --tp N --pp M [--vpp K]`."""

import sys

from megatron_r1v3.cli import main

if __name__ == "__main__":  # dist_checkpointing spawns helpers: the guard is required
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
