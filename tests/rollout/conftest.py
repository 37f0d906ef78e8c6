"""One 4-rank launch shared by test_vllm_refit.py, test_spmd_engines.py and test_verifier.py (the vLLM and
megatron-core start-ups of four ranks, ~25 s of a 2-core box, paid once; `spmd_workers.refit_then_spmd`)."""

from __future__ import annotations

import tempfile

import pytest

ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}


@pytest.fixture(scope="session")
def four_rank_engines() -> list[dict]:
    """Each rank's {'refit': rank-0 engine refit results, 'spmd': SPMD engine results} (+ 'verifier' on rank 0)."""
    from megatron_r1v3.parallel.spawn import run_distributed

    with tempfile.TemporaryDirectory(prefix="r1v3-engines-") as workdir:
        return run_distributed("tests.rollout.spmd_workers:refit_then_spmd", 4, timeout_s=900, env=ENV,
                               workdir=workdir)
