"""What the rollout engine asks of vLLM per device, checked without starting vLLM: the `LLM(...)` keyword arguments
(`llm_kwargs`), the environment defaults (`engine_env`), the dtype resolution (`rollout_dtype`), and that
`RolloutEngine` passes exactly those on a (pretend) GPU. CPU values are what the vLLM parity tests run with."""

from __future__ import annotations

import dataclasses
import os
import sys
import types

import pytest
import torch

from megatron_r1v3.rollout import engine as engine_mod
from megatron_r1v3.rollout.engine import engine_env, llm_kwargs, rollout_dtype

COMMON = dict(max_model_len=512, seed=3, kv_cache_bytes=32 * 2**20, gpu_memory_utilization=0.4, max_num_seqs=64)


def test_rollout_dtype_auto_follows_the_device_and_explicit_names_stay():
    assert rollout_dtype("auto", on_gpu=False) == "fp32"
    assert rollout_dtype("auto", on_gpu=True) == "bf16"
    for on_gpu in (False, True):
        assert rollout_dtype("fp32", on_gpu) == "fp32" and rollout_dtype("bf16", on_gpu) == "bf16"
    assert rollout_dtype("auto") == ("bf16" if torch.cuda.is_available() else "fp32")
    for bad in ("fp16", "float32", "bfloat16", ""):
        with pytest.raises(ValueError, match="auto, fp32 or bf16"):
            rollout_dtype(bad, on_gpu=True)


def test_cpu_kwargs_are_eager_fp32_with_a_byte_sized_kv_cache():
    kw = llm_kwargs("/m", on_gpu=False, enable_sleep_mode=True, **COMMON)
    assert kw == dict(model="/m", dtype="float32", seed=3, enforce_eager=True, max_model_len=512,
                      logprobs_mode="raw_logprobs", enable_sleep_mode=False, max_num_seqs=64,
                      limit_mm_per_prompt={"image": 4, "video": 0}, kv_cache_memory_bytes=32 * 2**20)
    # CPU stays eager even when asked otherwise; bf16 only when asked
    assert llm_kwargs("/m", on_gpu=False, enforce_eager=False, **COMMON)["enforce_eager"] is True
    assert llm_kwargs("/m", on_gpu=False, dtype="bf16", **COMMON)["dtype"] == "bfloat16"


def test_gpu_kwargs_keep_cuda_graphs_and_serve_bf16():
    kw = llm_kwargs("/m", on_gpu=True, enable_sleep_mode=True, max_images_per_prompt=None, **COMMON)
    assert kw == dict(model="/m", dtype="bfloat16", seed=3, enforce_eager=False, max_model_len=512,
                      logprobs_mode="raw_logprobs", enable_sleep_mode=True, max_num_seqs=64,
                      gpu_memory_utilization=0.4)
    assert llm_kwargs("/m", on_gpu=True, enforce_eager=True, **COMMON)["enforce_eager"] is True
    assert llm_kwargs("/m", on_gpu=True, dtype="fp32", **COMMON)["dtype"] == "float32"


def test_env_disables_torch_compile_on_cpu_only():
    assert engine_env(on_gpu=False) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCH_COMPILE_DISABLE": "1"}
    assert engine_env(on_gpu=True) == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def test_kwargs_are_vllm_engine_args():
    """Every key we pass is a field of the installed vLLM's EngineArgs (what `LLM(**kwargs)` forwards to)."""
    arg_utils = pytest.importorskip("vllm.engine.arg_utils", reason="needs vLLM (the vLLM venv)")
    fields = {f.name for f in dataclasses.fields(arg_utils.EngineArgs)}
    for on_gpu in (False, True):
        kw = llm_kwargs("/m", on_gpu=on_gpu, enable_sleep_mode=True, **COMMON)
        assert set(kw) - {"model"} <= fields, set(kw) - fields


class _FakeLLM:
    seen: dict = {}

    def __init__(self, **kwargs):
        _FakeLLM.seen = kwargs
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace())

    def get_tokenizer(self):
        return "tokenizer"


def test_engine_on_a_gpu_passes_the_gpu_kwargs_and_leaves_torch_compile_alone(monkeypatch):
    """One code path: with CUDA reported available, `RolloutEngine` builds `LLM` from `llm_kwargs(on_gpu=True)` and
    sets no TORCH_COMPILE_DISABLE (vLLM itself is replaced by a stand-in that records its arguments)."""
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_FakeLLM))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TORCH_COMPILE_DISABLE", raising=False)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = engine_mod.RolloutEngine("/m", max_model_len=512, seed=3, kv_cache_bytes=32 * 2**20,
                                      gpu_memory_utilization=0.4)
    assert engine.on_gpu and engine.sleep_enabled and engine.dtype == "bf16"
    assert _FakeLLM.seen == llm_kwargs("/m", on_gpu=True, enable_sleep_mode=True, **COMMON)
    assert _FakeLLM.seen["enforce_eager"] is False and _FakeLLM.seen["dtype"] == "bfloat16"
    assert "TORCH_COMPILE_DISABLE" not in os.environ
    engine.close()
