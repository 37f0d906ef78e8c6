"""Lets megatron-core run on CPU with gloo by redirecting its hard-coded CUDA calls to the CPU.

Applied once, before megatron-core is imported, and only when CUDA is absent (`apply_cpu_shim()` is a no-op on a
GPU machine). It is a global wrap of torch functions rather than a TorchFunctionMode because a mode is not active
inside autograd backward, where activation recompute and sequence-parallel backward allocate tensors.
What it changes:
  1. `torch.cuda.current_device()` -> 0; `set_device/synchronize/empty_cache` -> no-ops; streams/events -> inert.
  2. torch factory functions, `Tensor.new_*`, `Tensor.to/.cuda()` given a CUDA device (or a bare index) -> CPU.
  3. `Tensor.type()` reports `torch.cuda.*Tensor` for CPU tensors (megatron's optimizer asserts on it).
  4. megatron's CUDA RNG tracker forks the CPU generator; `torch.cuda.manual_seed/get_rng_state` use the CPU one
     (patched the moment megatron-core's RNG module is first imported, so tools that never import megatron-core,
     like HF -> Megatron conversion, start without paying for it).
  5. megatron-core's `jit_fuser` (torch.compile, for the fused bias/activation kernels that CPU runs leave off:
     `models.specs.fusion_flags`) is megatron's own no-op decorator (`disable_jit_fuser`), set the moment
     `megatron.core.jit` has run and before its importers bind it: decorating with torch.compile imports dynamo and
     inductor, 2 of a rank's 3.5 s of imports on the 2-core box.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
from typing import Any

import torch

_APPLIED = False
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
    "empty_strided", "linspace", "eye",
)
_TENSOR_NEW = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def shim_applied() -> bool:
    """True once the shim is active in this process."""
    return _APPLIED


def _is_cuda(device: Any) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare index means a CUDA device to torch
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_kwargs(kwargs: dict) -> dict:
    if _is_cuda(kwargs.get("device")):
        kwargs["device"] = "cpu"
    kwargs.pop("pin_memory", None)
    return kwargs


def _wrap_factory(fn):
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        return fn(*args, **_cpu_kwargs(kwargs))

    return factory


def _wrap_to(orig):
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and _is_cuda(args[0]):
            args = ("cpu",) + args[1:]
        return orig(self, *args, **_cpu_kwargs(kwargs))

    return to


def _wrap_type(orig):
    @functools.wraps(orig)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            if self.device.type == "cpu" and name.startswith("torch.") and not name.startswith("torch.cuda."):
                return "torch.cuda." + name[len("torch."):]
            return name
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = "torch." + dtype[len("torch.cuda."):]
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


class _InertStream:
    """Stands in for torch.cuda.Stream/Event: CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _patch_torch() -> None:
    # torch's default-device mode (`with torch.device("meta")`, used by transformers' from_pretrained) recognises
    # constructors by identity in a cached set: build that cache now, from the original functions, or the
    # wrapped ones would stop honouring the default device (and transformers would wipe the tensors).
    from torch.utils import _device

    originals = frozenset(_device._device_constructors())
    _device._device_constructors = lambda: originals
    for name in _FACTORIES:
        setattr(torch, name, _wrap_factory(getattr(torch, name)))
    for name in _TENSOR_NEW:
        setattr(torch.Tensor, name, _wrap_factory(getattr(torch.Tensor, name)))
    torch.Tensor.to = _wrap_to(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.Tensor.type = _wrap_type(torch.Tensor.type)
    torch.nn.Module.cuda = lambda self, *a, **k: self

    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))  # torch.manual_seed
    # itself calls cuda.manual_seed_all, which stays the (lazy, harmless) original.
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def _patch_megatron_rng(mrandom) -> None:
    """Patch megatron.core.tensor_parallel.random (the module object)."""

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """megatron's tracker with the CPU generator; no 'CPU RNG changed' warning (it *is* the CPU RNG)."""

        def __init__(self, *args, **kwargs):
            kwargs["use_cudagraphable_rng"] = False
            super().__init__(*args, **kwargs)

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig_state, orig_name = torch.get_rng_state(), self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def apply_cpu_shim(force: bool = False) -> bool:
    """Install the shim if CUDA is absent (or `force`); returns whether it is active. Idempotent."""
    global _APPLIED
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _patch_torch()
    if _RNG_MODULE in sys.modules:
        _patch_megatron_rng(sys.modules[_RNG_MODULE])
    else:  # megatron-core not imported yet (and maybe never: conversion, config tools): patch it when it is
        sys.meta_path.insert(0, _AfterImport(_RNG_MODULE, _patch_megatron_rng))
    if _JIT_MODULE not in sys.modules:  # imported already: its importers hold torch.compile, nothing to change
        sys.meta_path.insert(0, _AfterImport(_JIT_MODULE, _no_jit_fuser))
    _APPLIED = True
    return True


_RNG_MODULE = "megatron.core.tensor_parallel.random"
_JIT_MODULE = "megatron.core.jit"


def _no_jit_fuser(module) -> None:
    disable = getattr(module, "disable_jit_fuser", None)
    if disable is not None:
        disable()


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls `fn(module)` right after module `name` has executed, before any importer can bind its names."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the regular finders locate the module
        spec = importlib.util.find_spec(fullname)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            self.fn(module)

        spec.loader.exec_module = exec_module
        return spec
