"""Post-install fix-up for vLLM on CPU: make the CUDA torchvision wheel importable next to CPU torch.

The only torchvision wheel for torch 2.13 is a CUDA build. Its `_meta_registrations.py` registers fake kernels for
`torchvision::nms`/`qnms` unconditionally, and those operators do not exist when the compiled extension cannot load,
so `import torchvision` fails. vLLM's InternVL processor (GotOcr2ImageProcessor) only needs torchvision's pure-Python
transforms, so guarding the two registrations with `torchvision.extension._has_ops()` (as torchvision already does for
its other meta kernels) is enough. Run: `python -m megatron_r1v3.rollout.fixups`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_GUARD = "(torch.library.register_fake({op}) if torchvision.extension._has_ops() else (lambda fn: fn))"
_OPS = ('"torchvision::nms"', '"torchvision::qnms"')


def torchvision_meta_file() -> Path | None:
    """Path of torchvision's `_meta_registrations.py` without importing torchvision (None when not installed)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"


def guard_torchvision_meta_registrations(path: Path | None = None) -> bool:
    """Guard the nms/qnms fake-kernel registrations; idempotent. Returns True when the file was changed."""
    path = path or torchvision_meta_file()
    if path is None or not path.is_file():
        return False
    text = original = path.read_text()
    for op in _OPS:
        text = text.replace(f"@torch.library.register_fake({op})\n", f"@{_GUARD.format(op=op)}\n")
    if text == original:
        return False
    path.write_text(text)
    for cached in path.parent.glob("__pycache__/_meta_registrations.*.pyc"):
        cached.unlink()
    return True


if __name__ == "__main__":
    changed = guard_torchvision_meta_registrations()
    print(f"torchvision meta registrations: {'guarded' if changed else 'already guarded or absent'}")
    sys.exit(0)
