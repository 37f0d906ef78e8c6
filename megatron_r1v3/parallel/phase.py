"""What this rank is doing right now, so a hung multi-process run can say which rank stalled where.

`set_phase()` is cheap: it keeps the name in memory and, when `R1V3_PHASE_FILE` is set (by the test launcher or a
watchdog), rewrites that small file.
"""

from __future__ import annotations

import os
import time

_current = "start"


def set_phase(name: str) -> None:
    """Record the phase this rank entered."""
    global _current
    _current = name
    path = os.environ.get("R1V3_PHASE_FILE")
    if path:
        with open(path, "w") as f:
            f.write(f"{time.time():.3f} {name}")


def current_phase() -> str:
    """The last phase recorded in this process."""
    return _current
