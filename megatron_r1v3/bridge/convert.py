"""HF <-> Megatron checkpoint conversion at any TP/PP, streaming tensor by tensor, all-or-nothing on disk.

A Megatron checkpoint directory holds `model/` (megatron-core dist_checkpointing, loadable at any layout),
`r1v3_meta.json` (model config, dtype, source layout) and `hf_assets/` (tokenizer, processor, chat template and the
original config.json, copied verbatim so a round trip restores them). Output goes to a hidden temporary directory
that is renamed at the very end: a failed conversion leaves nothing that looks complete.

HF -> Megatron runs in one process whatever the target layout: every name and shape is checked against the config
from the safetensors headers first, then `bridge/dist_writer.py` writes megatron-core's layout
(`bridge/mcore_layout.py`) building one tensor at a time. Megatron -> HF runs on tp*pp ranks: it loads the
checkpoint into the real model and streams full tensors out (`bridge/export.py`), like the vLLM refit.
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

from megatron_r1v3.bridge.dist_writer import LazyChunk, save_lazy
from megatron_r1v3.bridge.hf_io import (
    HFCheckpoint,
    ShardedSafetensorsWriter,
    copy_assets,
    hf_config_from_model,
)
from megatron_r1v3.bridge.mapping import MappingError, expected_hf_names, to_hf, to_megatron
from megatron_r1v3.bridge.mcore_layout import chunks as megatron_chunks
from megatron_r1v3.bridge.mcore_layout import extra_state_keys
from megatron_r1v3.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    PrecisionConfig,
    RunConfig,
    TrainConfig,
    as_dict,
    dtype_name,
    torch_dtype,
)
from megatron_r1v3.parallel.agree import agree_on_errors
from megatron_r1v3.parallel.layout import ParallelLayout

META = "r1v3_meta.json"


class ConversionError(RuntimeError):
    """Conversion failed; the message names the tensor / field / rank. The output directory was not created."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


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
    agree_on_errors(err, ConversionError)
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
    """The run config of a conversion/parity job: the checkpoint's model and dtype, local layer spec. It trains
    nothing, so its data/train sections are the neutral ones every model passes (one microbatch, a sequence as long
    as the model's positions): the start-time checks judge the checkpoint's layout, not a recipe's defaults."""
    return RunConfig(
        model=model,
        parallel=ParallelConfig(tensor=tp, pipeline=pp, virtual_pipeline=vpp),
        precision=PrecisionConfig(params_dtype=dtype_name(dtype), transformer_impl="local"),
        data=DataConfig(seq_length=model.language.max_position_embeddings),
        train=TrainConfig(global_batch_size=1, micro_batch_size=1),
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


def plan_hf_to_megatron(hf: HFCheckpoint, model: ModelConfig, dtype: torch.dtype) -> list[LazyChunk]:
    """Check every HF name and shape against the config (headers only, nothing read) and return the lazy chunks of
    the Megatron checkpoint. Raises MappingError naming the tensor: missing, unexpected, or not fitting config.json."""
    plan, used = [], set()
    for c in megatron_chunks(model):
        # the HF tensors the config implies (shape ops on meta tensors: nothing allocated) vs the file headers
        for name, want in to_hf(c.name, torch.empty(c.shape, dtype=dtype, device="meta"), model, hf.layout):
            got = tuple(hf.meta(name).shape)  # raises MappingError naming a missing tensor
            if got != tuple(want.shape):
                raise MappingError(f"shape mismatch: HF {hf.stored(name)} is {got}, but config.json ({hf.path}) implies"
                                   f" {tuple(want.shape)} (for Megatron {c.name} {c.shape})")
            used.add(name)

        def make(name=c.name, sizes=c.sizes):
            return to_megatron(name, hf.get, model, hf.layout)[0].to(dtype).reshape(sizes)

        plan.append(LazyChunk(c.key, c.global_shape, c.offset, c.sizes, dtype, make))
    unexpected = sorted(hf.stored(n) for n in set(hf.names()) - used)
    if unexpected:
        raise MappingError(f"unexpected tensor(s) in {hf.path}: {', '.join(unexpected[:10])}"
                           + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    return plan


def hf_to_megatron(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, vpp: int | None = None,
                   progress: bool = True, fsync: bool = True) -> dict:
    """One process for any target TP/PP (checked to be a valid layout for the model). Returns
    {'tensors': HF tensors converted, 'seconds': phase timers}."""
    t = {"start": time.perf_counter()}
    hf = HFCheckpoint(hf_dir)
    model, dtype = hf.model_config(), hf.dtype()
    problems = ParallelLayout(tp=tp, pp=pp, vpp=vpp).problems(model, te_available=False)  # the target layout only
    if problems:
        raise ConfigError(f"cannot convert {hf_dir} to TP{tp}·PP{pp}: " + "; ".join(problems))
    plan = plan_hf_to_megatron(hf, model, dtype)
    objects = {key: None for key in extra_state_keys(model)}  # linear layers' `_extra_state` (None: no FP8 state)
    t["planned"] = time.perf_counter()
    with atomic_output_dir(Path(out_dir)) as tmp:
        (tmp / "model").mkdir()
        with tqdm(total=len(plan) + len(objects), desc="hf->megatron", unit="tensor", disable=not progress) as bar:
            save_lazy(tmp / "model", plan, objects, on_item=bar.update, fsync=fsync)
        t["saved"] = time.perf_counter()
        meta = {"format": 1, "model": as_dict(model), "dtype": dtype_name(dtype), "source_layout": hf.layout,
                "source": str(Path(hf_dir).resolve()), "saved_at": {"tp": tp, "pp": pp, "vpp": vpp}}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        copy_assets([*hf.asset_files(), hf.path / "config.json"], tmp / "hf_assets")
    t["done"] = time.perf_counter()
    phases = {"check names+shapes": t["planned"] - t["start"], "read+transform+write": t["saved"] - t["planned"],
              "finish": t["done"] - t["saved"]}
    return {"tensors": len(hf.names()), "seconds": phases}


def write_training_meta(cfg, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """`r1v3_meta.json` + `hf_assets/` (the tokenizer) for a training checkpoint, so `r1v3 convert megatron-to-hf`
    exports it like a converted one (config.json is derived from the model config; layout native)."""
    from megatron_r1v3.models.specs import params_dtype

    out = Path(out_dir)
    meta = {"format": 1, "model": as_dict(cfg.model), "dtype": dtype_name(params_dtype(cfg)),
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


def check_checkpoint_model(model: ModelConfig, path: str | Path) -> None:
    """The model a run builds must be the one a checkpoint holds (its `r1v3_meta.json`, written by conversion and
    by every training checkpoint): ConfigError naming each differing `model.*` field. `path` may be a converted
    dir, a training `step_*` dir or a run's checkpoints root (its `latest`). Checkpoints without metadata pass."""
    root = Path(path)
    if (root / "latest").is_file():
        root = root / (root / "latest").read_text().strip()
    if not (root / META).is_file():
        return
    saved = read_meta(root)["model"]
    # the architecture and the splice token; padding multiples compare by what they pad to. Not compared: the
    # preset name, training choices (recompute), init values (layer scale), tokenizer ids the data path checks.
    keys = ("vision", "connector", "language", "image_context_token_id")
    theirs, ours = ({k: as_dict(m)[k] for k in keys} for m in (saved, model))
    ignored = {"activation_recompute", "layer_scale_init", "head_pad_multiple", "make_vocab_size_divisible_by"}
    for mine, cfg in ((theirs, saved), (ours, model)):
        mine["vision"]["padded_heads"] = cfg.vision.padded_heads
        mine["language"]["padded_vocab_size"] = cfg.language.padded_vocab_size

    def diffs(a: dict, b: dict, prefix: str) -> list[str]:
        out = []
        for key in sorted(set(a) | set(b)):
            if key in ignored:
                continue
            x, y = a.get(key), b.get(key)
            if isinstance(x, dict) and isinstance(y, dict):
                out += diffs(x, y, f"{prefix}{key}.")
            elif x != y:
                out.append(f"{prefix}{key}={x!r} but the checkpoint has {y!r}")
        return out

    found = diffs(ours, theirs, "model.")
    if found:
        raise ConfigError(f"checkpoint.load={path} holds another model than the recipe builds ({root / META}): "
                          + "; ".join(found) + " (set those fields, or pick the recipe's model preset that matches)")


def megatron_to_hf(
    megatron_dir: str, out_dir: str, layout: str | None = None, tp: int = 1, pp: int = 1,
    max_shard_bytes: int = 5 * 2**30,
) -> dict:
    """Collective over tp*pp ranks; rank 0 writes sharded safetensors + index, config.json and the assets."""
    from megatron_r1v3.bridge.export import iter_hf_tensors
    from megatron_r1v3.models.weights import load_model

    meta = read_meta(megatron_dir)
    model, dtype = meta["model"], torch_dtype(meta["dtype"])
    layout = layout or meta.get("source_layout") or "native"
    cfg = conversion_run_config(model, dtype, tp, pp, None)
    state, chunks = build_for_conversion(cfg)
    load_model(chunks, Path(megatron_dir) / "model")
    assets = Path(megatron_dir) / "hf_assets"
    with atomic_output_dir(Path(out_dir)) as tmp:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes, layout) if state.rank == 0 else None
        err = None
        stream = iter_hf_tensors(chunks, model, layout, transport="p2p")  # one pass: no shared-memory mirror
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
        agree_on_errors(err, ConversionError)
    return {"tensors": len(writer.written) if writer else 0}


def _write_hf_config(out: Path, assets: Path, model, layout: str, source_layout: str | None, dtype) -> None:
    files = [p for p in assets.iterdir() if p.is_file()] if assets.is_dir() else []
    copy_assets([p for p in files if p.name != "config.json"], out)
    original = assets / "config.json"
    if layout == source_layout and original.is_file():
        shutil.copy2(original, out / "config.json")
    else:
        (out / "config.json").write_text(json.dumps(hf_config_from_model(model, layout, dtype), indent=2))
