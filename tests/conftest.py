"""The test process is an entry point like the CLI: set it up (CPU shim for megatron-core, warning filters) before
any test module imports megatron-core. Spawned ranks do the same in `parallel.spawn`.

`R1V3_REQUIRE=slurm,vllm,dali` (set by `.ci/run`) turns every skip for a missing component into a failure, so a
run cannot go green while Slurm, vLLM or DALI is silently absent. A skip is for a missing component when its reason
names it (`Slurm`, `vLLM`, `DALI` / `nvidia.dali`): the convention every such skip here follows.
"""

from __future__ import annotations

import os
import re

import pytest

from megatron_r1v3.parallel import setup_process

setup_process()

REQUIRE_VAR = "R1V3_REQUIRE"
# what a skip reason says when the component is missing (word match, case-insensitive)
COMPONENT_PATTERNS = {
    "slurm": re.compile(r"\bslurm", re.IGNORECASE),
    "vllm": re.compile(r"\bvllm\b", re.IGNORECASE),
    "dali": re.compile(r"\bdali\b", re.IGNORECASE),
}


def required_components(value: str | None) -> set[str]:
    """Parse `R1V3_REQUIRE` (comma list); an unknown name is an error naming it, not a silently ignored switch."""
    names = {n.strip().lower() for n in (value or "").split(",") if n.strip()}
    unknown = sorted(names - set(COMPONENT_PATTERNS))
    if unknown:
        raise ValueError(f"{REQUIRE_VAR}: unknown component(s) {unknown}; known: {sorted(COMPONENT_PATTERNS)}")
    return names


def missing_components(reason: str) -> set[str]:
    """The components a skip reason says are missing."""
    return {name for name, pattern in COMPONENT_PATTERNS.items() if pattern.search(reason)}


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, lineno, "Skipped: reason")
        return str(longrepr[2])
    return str(longrepr)


def _enforce(report) -> None:
    """Turn a skip report for a required component into a failure that says which component and why."""
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    required = required_components(os.environ.get(REQUIRE_VAR))
    reason = _skip_reason(report)
    hit = sorted(missing_components(reason) & required)
    if hit:
        report.outcome = "failed"
        report.longrepr = (f"{REQUIRE_VAR}={os.environ[REQUIRE_VAR]} requires {', '.join(hit)}, but the test was "
                           f"skipped: {reason}")


def pytest_configure(config) -> None:
    """Refuse a malformed `R1V3_REQUIRE` before any test runs."""
    try:
        required_components(os.environ.get(REQUIRE_VAR))
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Skips in setup (fixtures), the call and `skipif` marks."""
    outcome = yield
    _enforce(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Module-level skips (`pytest.importorskip` at import, `allow_module_level=True`)."""
    outcome = yield
    _enforce(outcome.get_result())
