"""HF <-> Megatron checkpoint conversion at any TP/PP, streaming tensor by tensor, all-or-nothing on disk.

A Megatron checkpoint directory holds `model/` (megatron-core dist_checkpointing, loadable at any layout),
`r1v3_meta.json` (model config, dtype, source layout) and `hf_assets/` (tokenizer, processor, chat template and the
original config.json, copied verbatim so a round trip restores them). Output goes to a hidden temporary directory
that is renamed at the very end: a failed conversion leaves nothing that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm import tqdm

from megatron_r1v3.bridge.export import iter_hf_tensors
from megatron_r1v3.bridge.hf_io import (
    HFCheckpoint,
    HFFormatError,
    ShardedSafetensorsWriter,
    copy_assets,
    hf_config_from_model,
)
from megatron_r1v3.bridge.mapping import MappingError, expected_hf_names, find_rule, to_megatron
from megatron_r1v3.bridge.shard import full_shape, global_named_parameters, tp_slice
from megatron_r1v3.config import ModelConfig, ParallelConfig, PrecisionConfig, RunConfig, as_dict
from megatron_r1v3.parallel.phase import set_phase

META = "r1v3_meta.json"
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_NAMED_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


class ConversionError(RuntimeError):
    """Conversion failed; the message names the tensor / field / rank. The output directory was not created."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def agree_on_errors(exc: BaseException | None) -> None:
    """Collective: if any rank failed, every rank raises the same ConversionError (no rank waits forever)."""
    msg = None if exc is None else f"{type(exc).__name__}: {exc}"
    msgs = [msg]
    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, msg)
    failed = sorted({m for m in msgs if m})
    if failed:
        where = [f"rank {r}" for r, m in enumerate(msgs) if m]
        raise ConversionError(f"{'; '.join(failed)} ({', '.join(where)})") from exc


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def atomic_output_dir(out: Path):
    """Yield a temporary sibling directory; rename it to `out` on success, delete it on failure (rank 0 acts)."""
    out = Path(out)
    err = None
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        err = ConversionError(f"output {out} already exists and is not empty; refusing to overwrite")
    agree_on_errors(err)
    tmp = out.parent / f".{out.name}.partial"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        yield tmp
        _barrier()
        if _rank() == 0:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()


def conversion_run_config(model: ModelConfig, dtype: torch.dtype, tp: int, pp: int, vpp: int | None) -> RunConfig:
    """The run config of a conversion/parity job: the checkpoint's model and dtype, local layer spec."""
    return RunConfig(
        model=model,
        parallel=ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp),
        precision=PrecisionConfig(params_dtype=_DTYPE_NAMES[dtype], transformer_impl="local"),
    )


def build_for_conversion(cfg: RunConfig):
    """Init the process groups (exactly tp*pp ranks) and build uninitialised model chunks to be loaded."""
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import init_parallel

    state = init_parallel(cfg)
    if dist.get_world_size() != cfg.parallel.tensor * cfg.parallel.pipeline:
        raise ConversionError(
            f"conversion runs with exactly tp*pp = {cfg.parallel.tensor * cfg.parallel.pipeline} processes,"
            f" got world size {dist.get_world_size()}"
        )
    return state, build_model(cfg, init=False)


def load_hf_into_model(chunks, hf: HFCheckpoint, model: ModelConfig, progress: bool = False) -> set[str]:
    """Fill this rank's shards from HF tensors via the mapping table; returns the HF names consumed."""
    consumed: set[str] = set()
    params = [(name, p) for chunk in chunks for name, p in global_named_parameters(chunk)]
    for name, param in tqdm(params, desc="hf->megatron", disable=not progress, unit="tensor"):
        set_phase(f"hf->megatron {name}")
        rule, _ = find_rule(name)
        try:
            full, names = to_megatron(name, hf.get, model, hf.layout)
        except (RuntimeError, ValueError) as exc:  # reshape failures: tensors do not fit the config
            raise MappingError(f"HF tensors for {name} do not fit config.json ({hf.path}): {exc}") from exc
        if tuple(full.shape) != full_shape(param):
            shapes = {n: tuple(hf.get(n).shape) for n in names}
            raise MappingError(
                f"shape mismatch: HF {shapes} gives Megatron {name} {tuple(full.shape)}, but config.json"
                f" ({hf.path}) implies {full_shape(param)}"
            )
        with torch.no_grad():
            param.copy_(tp_slice(full, param, rule.tp_gated).to(param.dtype))
        consumed.update(names)
    return consumed


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, vpp: int | None = None) -> dict:
    """Collective over tp*pp ranks. Returns {'tensors': number of HF tensors converted}."""
    t = {"start": time.perf_counter()}
    hf = HFCheckpoint(hf_dir)
    model, dtype = hf.model_config(), hf.dtype()
    cfg = conversion_run_config(model, dtype, tp, pp, vpp)
    from megatron_r1v3.training.checkpoint import save_model

    state, chunks = build_for_conversion(cfg)
    t["built"] = time.perf_counter()
    err, consumed = None, set()
    try:
        consumed = load_hf_into_model(chunks, hf, model, progress=state.rank == 0)
    except (MappingError, HFFormatError) as exc:
        err = exc
    agree_on_errors(err)
    everything = [consumed]
    if dist.get_world_size() > 1:
        everything = [None] * dist.get_world_size()
        dist.all_gather_object(everything, consumed)
    used = set().union(*everything)
    unexpected = sorted(set(hf.names()) - used)
    agree_on_errors(MappingError(f"unexpected tensor(s) in {hf_dir}: {', '.join(unexpected[:10])}"
                                 + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
                    if unexpected else None)
    t["loaded"] = time.perf_counter()
    with atomic_output_dir(Path(out_dir)) as tmp:
        save_model(chunks, tmp / "model")
        t["saved"] = time.perf_counter()
        if state.rank == 0:
            meta = {"format": 1, "model": as_dict(model), "dtype": _DTYPE_NAMES[dtype], "source_layout": hf.layout,
                    "source": str(Path(hf_dir).resolve()), "saved_at": {"tp": tp, "pp": pp, "vpp": vpp}}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            copy_assets([*hf.asset_files(), hf.path / "config.json"], tmp / "hf_assets")
    t["done"] = time.perf_counter()
    phases = {"init+build": t["built"] - t["start"], "read+transform": t["loaded"] - t["built"],
              "dist_checkpointing save": t["saved"] - t["loaded"], "finish": t["done"] - t["saved"]}
    return {"tensors": len(used), "seconds": phases}


def write_training_meta(cfg, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """`r1v3_meta.json` + `hf_assets/` (the tokenizer) for a training checkpoint, so `r1v3 convert megatron-to-hf`
    exports it like a converted one (config.json is derived from the model config; layout native)."""
    from megatron_r1v3.models.specs import params_dtype

    out = Path(out_dir)
    meta = {"format": 1, "model": as_dict(cfg.model), "dtype": _DTYPE_NAMES[params_dtype(cfg)],
            "source_layout": None, "source": "training", "saved_at": {"tp": cfg.parallel.tensor,
                                                                       "pp": cfg.parallel.pipeline}}
    (out / META).write_text(json.dumps(meta, indent=2))
    tok = Path(tokenizer_dir)
    copy_assets([f for f in sorted(tok.iterdir()) if f.is_file() and f.name != "config.json"], out / "hf_assets")


def read_meta(megatron_dir: str | Path) -> dict:
    path = Path(megatron_dir) / META
    if not path.is_file():
        raise ConversionError(f"{path} not found: not a megatron_r1v3 checkpoint directory")
    meta = json.loads(path.read_text())
    meta["model"] = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), meta["model"]))
    return meta


def megatron_to_hf(
    megatron_dir: str, out_dir: str, layout: str | None = None, tp: int = 1, pp: int = 1,
    max_shard_bytes: int = 5 * 2**30,
) -> dict:
    """Collective over tp*pp ranks; rank 0 writes sharded safetensors + index, config.json and the assets."""
    from megatron_r1v3.training.checkpoint import load_model

    meta = read_meta(megatron_dir)
    model, dtype = meta["model"], _NAMED_DTYPES[meta["dtype"]]
    layout = layout or meta.get("source_layout") or "native"
    cfg = conversion_run_config(model, dtype, tp, pp, None)
    state, chunks = build_for_conversion(cfg)
    load_model(chunks, Path(megatron_dir) / "model")
    assets = Path(megatron_dir) / "hf_assets"
    with atomic_output_dir(Path(out_dir)) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes) if state.rank == 0 else None
        err = None
        stream = iter_hf_tensors(chunks, model, layout)
        for hf_name, tensor in tqdm(stream, desc="megatron->hf", disable=state.rank != 0, unit="tensor"):
            if writer is not None and err is None:
                try:
                    writer.add(hf_name, tensor.to(dtype))
                except MappingError as exc:
                    err = exc
        if writer is not None and err is None:
            missing = sorted(set(expected_hf_names(model, layout)) - set(writer.written))
            extra = sorted(set(writer.written) - set(expected_hf_names(model, layout)))
            if missing or extra:
                err = MappingError(f"export manifest mismatch: missing {missing[:10]}, unexpected {extra[:10]}")
            else:
                writer.close()
                _write_hf_config(tmp, assets, model, layout, meta.get("source_layout"), dtype)
        agree_on_errors(err)
    return {"tensors": len(writer.written) if writer else 0}


def _write_hf_config(out: Path, assets: Path, model, layout: str, source_layout: str | None, dtype) -> None:
    files = [p for p in assets.iterdir() if p.is_file()] if assets.is_dir() else []
    copy_assets([p for p in files if p.name != "config.json"], out)
    original = assets / "config.json"
    if layout == source_layout and original.is_file():
        shutil.copy2(original, out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(hf_config_from_model(model, layout, dtype), indent=2))
