"""Random HF checkpoints of any R1V3/InternVL shape in either layout, written tensor by tensor (tests, benchmarks).

Names and shapes come from transformers' `InternVLForConditionalGeneration` built on the meta device (so the
native layout is exactly what transformers and vLLM load); the remote layout is derived through the mapping table.
Values are seeded per tensor name, so the same call always writes the same bytes.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from megatron_r1v3.bridge.hf_io import ShardedSafetensorsWriter, hf_config_from_model
from megatron_r1v3.bridge.mapping import convert_layout
from megatron_r1v3.config import ModelConfig


def native_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of the native layout, read off transformers' model class (meta device, no memory)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig.from_dict(hf_config_from_model(model, "native", torch.float32))
    with torch.device("meta"):
        hf = InternVLForConditionalGeneration(cfg)
    return {name: tuple(t.shape) for name, t in hf.state_dict().items()}


def random_value(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """The seeded random value of one HF tensor (norm weights near 1, layer scales near 0.1, the rest small)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    noise = torch.randn(shape, generator=g)
    if name.endswith(("lambda_1", "lambda_2")):
        return (0.1 + 0.01 * noise).to(dtype)
    if "norm" in name and name.endswith("weight"):
        return (1.0 + 0.05 * noise).to(dtype)
    return (0.05 * noise).to(dtype)


def write_random_hf_checkpoint(
    out_dir: str | Path, model: ModelConfig, layout: str = "native", dtype: torch.dtype = torch.float32,
    seed: int = 0, max_shard_bytes: int = 2**30,
) -> Path:
    """Write config.json + (sharded) safetensors for a random model; returns the directory."""
    out = Path(out_dir)
    shapes = native_shapes(model)
    read = lambda name: random_value(name, shapes[name], seed, dtype)  # noqa: E731
    writer = ShardedSafetensorsWriter(out, max_shard_bytes, layout)
    stream = ((n, read(n)) for n in shapes) if layout == "native" else convert_layout(read, model, "native", layout)
    for name, tensor in stream:
        writer.add(name, tensor)
    writer.close()
    (out / "config.json").write_text(json.dumps(hf_config_from_model(model, layout, dtype), indent=2))
    return out
