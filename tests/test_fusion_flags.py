"""megatron-core's fusion switches (`models.specs.fusion_flags`): off on CPU; on GPU each is on only when the
kernels it needs import (Apex's softmax extensions, Triton for torch.compile), so a GPU box without Apex runs."""

from __future__ import annotations

import sys
import types

import pytest

from megatron_r1v3.models import specs
from megatron_r1v3.models.specs import FUSION_MODULES, fusion_flags

APEX_SOFTMAX = FUSION_MODULES["masked_softmax_fusion"]


def _present(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))


def _failing(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises ImportError


def test_gpu_with_apex_and_triton_fuses_everything(monkeypatch):
    _present(monkeypatch, *APEX_SOFTMAX, "triton")
    assert fusion_flags(on_gpu=True) == dict(masked_softmax_fusion=True, bias_activation_fusion=True,
                                             bias_dropout_fusion=True)


@pytest.mark.parametrize("missing", APEX_SOFTMAX)
def test_gpu_without_apex_softmax_kernels_uses_the_torch_softmax(monkeypatch, missing):
    _present(monkeypatch, *APEX_SOFTMAX, "triton")
    _failing(monkeypatch, missing)
    assert fusion_flags(on_gpu=True) == dict(masked_softmax_fusion=False, bias_activation_fusion=True,
                                             bias_dropout_fusion=True)


def test_gpu_without_triton_leaves_the_bias_fusions_off(monkeypatch):
    _present(monkeypatch, *APEX_SOFTMAX)
    _failing(monkeypatch, "triton")
    assert fusion_flags(on_gpu=True) == dict(masked_softmax_fusion=True, bias_activation_fusion=False,
                                             bias_dropout_fusion=False)


def test_a_module_that_fails_to_load_counts_as_missing(monkeypatch):
    def broken(name):
        raise OSError(f"{name}: undefined symbol")  # e.g. an extension built against another torch

    monkeypatch.setattr(specs.importlib, "import_module", broken)
    assert not any(fusion_flags(on_gpu=True).values())


def test_cpu_never_fuses_and_common_config_is_unchanged(monkeypatch):
    _present(monkeypatch, *APEX_SOFTMAX, "triton")
    assert not any(fusion_flags(on_gpu=False).values())
    if specs.torch.cuda.is_available():
        pytest.skip("checks the CPU config")
    from megatron_r1v3.config import RunConfig
    from megatron_r1v3.parallel.layout import ParallelLayout

    common = specs._common(RunConfig(), ParallelLayout())
    assert [common[k] for k in FUSION_MODULES] == [False, False, False]
