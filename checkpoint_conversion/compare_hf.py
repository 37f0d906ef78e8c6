#!/usr/bin/env python
"""Same as `r1v3 compare-hf --hf DIR --megatron DIR --tp N --pp M [--image PATH] [--prompt TEXT]`."""

import sys

from megatron_r1v3.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-hf", *sys.argv[1:]]))
