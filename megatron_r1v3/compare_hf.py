"""`r1v3 compare-hf`: the transformers model and our Megatron model (any TP/PP) on the same image + prompt; reports
the largest absolute logit difference. Users run it after every conversion. A command (next to the CLI): it uses
the bridge, the data tiling and the training forward pass."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_r1v3.bridge.convert import build_for_conversion, conversion_run_config, read_meta
from megatron_r1v3.bridge.hf_io import HFCheckpoint
from megatron_r1v3.bridge.mapping import convert_layout
from megatron_r1v3.config import ModelConfig
from megatron_r1v3.data.tiling import TilingConfig, tile_image_pillow
from megatron_r1v3.models.weights import load_model
from megatron_r1v3.parallel.init import compute_device
from megatron_r1v3.parallel.phase import set_phase
from megatron_r1v3.training.step import forward_logits


def load_transformers_model(hf_dir: str | Path, dtype: torch.dtype = torch.float32):
    """`InternVLForConditionalGeneration` from a native directory, or from a remote-code one re-expressed natively."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    hf = HFCheckpoint(hf_dir)
    if hf.layout == "native":
        return InternVLForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype).eval()
    from megatron_r1v3.bridge.hf_io import hf_config_from_model

    model_cfg = hf.model_config()
    cfg = InternVLConfig.from_dict(hf_config_from_model(model_cfg, "native", dtype))
    model = InternVLForConditionalGeneration(cfg).to(dtype)
    state = dict(convert_layout(hf.get, model_cfg, "remote", "native"))
    model.load_state_dict(state, strict=True)
    return model.eval()


def build_inputs(model: ModelConfig, hf_dir: Path, image: str | None, prompt: str | None, seed: int = 0):
    """(input_ids [1, s], pixel_values [tiles, 3, S, S]); image via the shared tiling, prompt via the HF tokenizer."""
    g = torch.Generator().manual_seed(seed)
    size = model.vision.image_size
    if image:
        from PIL import Image

        pixels = tile_image_pillow(Image.open(image), TilingConfig(tile_size=size))
    else:
        pixels = torch.randn(2, 3, size, size, generator=g)
    if prompt:
        from transformers import AutoTokenizer

        text_ids = AutoTokenizer.from_pretrained(str(hf_dir))(prompt, add_special_tokens=False)["input_ids"]
    else:
        text_ids = torch.randint(0, model.language.vocab_size, (16,), generator=g)
        text_ids[text_ids == model.image_context_token_id] = 0
        text_ids = text_ids.tolist()
    n_img = pixels.shape[0] * model.tokens_per_tile
    wrap = [t for t in (model.image_start_token_id, model.image_end_token_id) if t < model.language.vocab_size]
    ids = wrap[:1] + [model.image_context_token_id] * n_img + wrap[1:]
    return torch.tensor([ids + list(text_ids)]), pixels


def compare_hf(hf_dir: str, megatron_dir: str, tp: int = 1, pp: int = 1, image: str | None = None,
               prompt: str | None = None) -> float:
    """Collective over tp*pp ranks; returns max |logit_hf - logit_megatron| (fp32) on every rank.

    Raises on every rank when no rank compared logits: 0.0 from an empty comparison must not read as parity.
    """
    meta = read_meta(megatron_dir)
    model = meta["model"]
    cfg = conversion_run_config(model, torch.float32, tp, pp, None)
    _, chunks = build_for_conversion(cfg)
    load_model(chunks, Path(megatron_dir) / "model")
    ids, pixels = build_inputs(model, Path(hf_dir), image, prompt)
    vocab, device = model.language.vocab_size, compute_device()
    ref = torch.empty(ids.shape[1], vocab, device=device)
    if dist.get_rank() == 0:
        set_phase("compare-hf: transformers forward")  # on the host: the reference need not fit a GPU
        with torch.no_grad():
            ref = load_transformers_model(hf_dir)(input_ids=ids, pixel_values=pixels).logits[0].float().to(device)
    dist.broadcast(ref, src=0)
    set_phase("compare-hf: megatron forward")
    batch = {"input_ids": ids, "pixel_values": pixels, "labels": ids, "loss_mask": torch.ones_like(ids)}
    logits = forward_logits(chunks, [batch], vocab)
    diff, compared = torch.zeros(1, device=device), torch.zeros(1, device=device)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
        diff, compared = (logits[0][0].float() - ref).abs().max().reshape(1), torch.ones(1, device=device)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    dist.all_reduce(compared)
    expected = dist.get_world_size() // (tp * pp)  # TP rank 0 of the last stage, once per data-parallel replica
    if int(compared.item()) != expected:
        raise RuntimeError(f"compare-hf: {int(compared.item())} ranks compared logits, expected {expected} "
                           "(TP rank 0 of the last pipeline stage)")
    return float(diff)
