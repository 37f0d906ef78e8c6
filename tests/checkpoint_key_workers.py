"""Runs inside one spawned rank (tests/test_checkpoint_keys.py): checkpoint keys and loads through megatron's
dist_checkpointing, which needs an `if __name__ == "__main__"`-safe process (it spawns a helper)."""

from __future__ import annotations

import torch

CONNECTOR_NORM = ("mlp1.layer_norm.weight", "mlp1.layer_norm.bias")


def _checkpoint_keys(path) -> tuple[list[str], list[str]]:
    """(tensor keys, object keys) of a torch_dist checkpoint directory."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    objects = sorted(k.split("/")[0] for k, m in md.items() if isinstance(m, BytesStorageMetadata))
    return sorted(k for k, m in md.items() if not isinstance(m, BytesStorageMetadata)), objects


def _mismatches(a: list[torch.nn.Module], b: list[torch.nn.Module]) -> list[str]:
    """Names of parameters that differ (bit for bit) between two builds of the same chunks."""
    out = []
    for x, y in zip(a, b):
        px, py = dict(x.named_parameters()), dict(y.named_parameters())
        assert px.keys() == py.keys()
        out += [n for n in px if not torch.equal(px[n], py[n])]
    return out


def _te_like(chunks: list[torch.nn.Module], received: list) -> None:
    """Give the final norm and every layer's core attention an `_extra_state` (non-empty bytes, as TE's FP8
    metadata), as the TE spec's TENorm and TEDotProductAttention have; record what loading hands them."""

    def with_extra_state(module: torch.nn.Module) -> None:
        base = type(module)
        module.__class__ = type(f"TELike{base.__name__}", (base,), {
            "get_extra_state": lambda self: torch.arange(7, dtype=torch.uint8),
            "set_extra_state": lambda self, state: received.append(state),
        })

    for chunk in chunks:
        decoder = chunk.language_model.decoder
        if decoder.final_layernorm is not None:
            with_extra_state(decoder.final_layernorm)
        for layer in decoder.layers:
            with_extra_state(layer.self_attention.core_attention)


def save_and_load(workdir: str, hf_dir: str, converted_dir: str) -> dict:
    from pathlib import Path

    from megatron_r1v3.bridge.convert import read_meta
    from megatron_r1v3.bridge.hf_io import HFCheckpoint
    from megatron_r1v3.bridge.mapping import to_megatron
    from megatron_r1v3.bridge.shard import global_named_parameters
    from megatron_r1v3.config import PrecisionConfig, RunConfig
    from megatron_r1v3.models import connector
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.models.weights import CheckpointMismatch, load_model, save_model
    from megatron_r1v3.parallel import init_parallel

    work, out = Path(workdir), {}
    meta = read_meta(converted_dir)
    # the model a run builds on this machine (transformer_impl auto: the local spec without TE)
    cfg = RunConfig(model=meta["model"], precision=PrecisionConfig(params_dtype=meta["dtype"]))
    init_parallel(cfg)

    # a converted checkpoint loads; every parameter equals the HF tensors through the mapping table
    chunks = build_model(cfg, init=False)
    load_model(chunks, Path(converted_dir) / "model")
    hf = HFCheckpoint(hf_dir)
    named = list(global_named_parameters(chunks[0]))
    out["converted_params"] = len(named)
    out["converted_mismatches"] = [n for n, p in named
                                   if not torch.equal(p, to_megatron(n, hf.get, cfg.model, hf.layout)[0])]
    tensors, _ = _checkpoint_keys(Path(converted_dir) / "model")
    out["converted_connector_keys"] = [k for k in tensors if "layer_norm" in k and k.startswith("mlp1.")]

    # the local model saves its connector norm under the TE names and loads it back bit-exactly
    g = torch.Generator().manual_seed(5)
    params = dict(chunks[0].named_parameters())
    with torch.no_grad():
        for name in CONNECTOR_NORM:
            params[name].copy_(torch.randn(params[name].shape, generator=g))
    out["norm_was_random"] = all(not torch.equal(params[n], torch.ones_like(params[n])) for n in CONNECTOR_NORM)
    save_model(chunks, work / "local")
    # the save's write results came back in-process: no multiprocessing Manager server left running (megatron-core
    # starts one on a process's first save otherwise), megatron-core's own queue untouched
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    out["children_after_save"] = [p.name for p in multiprocessing.active_children()]
    out["megatron_results_queue"] = repr(filesystem_async._results_queue)
    tensors, _ = _checkpoint_keys(work / "local")
    out["saved_connector_keys"] = [k for k in tensors if k.startswith("mlp1.")]
    fresh = build_model(cfg)
    load_model(fresh, work / "local")
    out["round_trip_mismatches"] = _mismatches(chunks, fresh)

    # TE-only `_extra_state` objects: absent from a local checkpoint -> None; surplus in a checkpoint -> skipped
    received: list = []
    te_like = build_model(cfg)
    _te_like(te_like, received)
    load_model(te_like, work / "local")
    out["te_like_received"] = received
    out["te_like_mismatches"] = _mismatches(chunks, te_like)
    save_model(te_like, work / "te_like")
    _, te_objects = _checkpoint_keys(work / "te_like")
    _, local_objects = _checkpoint_keys(work / "local")
    out["te_like_extra_objects"] = sorted(set(te_objects) - set(local_objects))
    back = build_model(cfg)
    load_model(back, work / "te_like")
    out["back_to_local_mismatches"] = _mismatches(chunks, back)

    # a checkpoint with the connector's pre-unification keys (`mlp1.layer_norm.*`) fails naming both sides
    saved_map = dict(connector.SHARDED_KEYS_MAP)
    connector.SHARDED_KEYS_MAP.clear()
    try:
        save_model(chunks, work / "legacy")
    finally:
        connector.SHARDED_KEYS_MAP.update(saved_map)
    try:
        load_model(build_model(cfg), work / "legacy")
        out["legacy_error"] = None
    except CheckpointMismatch as exc:
        out["legacy_error"] = f"{type(exc).__name__}: {exc}"
    return out
