"""Packed SFT rows (`data.pack=true`) through the real training step: the tiny VLM in one process (megatron-core's
local spec with our THD conversion, fp32), the toy task's image samples packed several to a row by the real
`SFTBatchIterator`. Each packed sample's loss (and gradient) equals the same sample run alone; the THD params that a
Transformer Engine run hands to TE's attention are built from the batch and reach the attention; bad packed batches
stop with the field named."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_r1v3.data.tiling import TilingConfig

SEQ, MBS = 256, 2  # packed rows of 256 tokens; toy samples are ~70-120 tokens with one image each


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """TP1 tiny model (fp32, local spec) and the toy task's first samples: packed [2, 256] batches and the same
    samples one per batch."""
    from megatron_r1v3.config import PrecisionConfig, RunConfig
    from megatron_r1v3.data.sft_dataset import SFTBatchIterator
    from megatron_r1v3.data.synthetic import generate_toy_dataset
    from megatron_r1v3.data.tokenizer import load_tokenizer, toy_tokenizer
    from megatron_r1v3.models.build import build_model
    from megatron_r1v3.parallel import destroy_parallel, init_parallel
    from megatron_r1v3.parallel.env import free_port
    from megatron_r1v3.presets import get_preset

    root = tmp_path_factory.mktemp("packing")
    toy = generate_toy_dataset(root / "toy", n_train=8, n_val=1, seed=5, image_size=56)
    tok = load_tokenizer(toy_tokenizer(root / "tokenizers"))
    cfg = RunConfig(model=get_preset("tiny"), precision=PrecisionConfig(transformer_impl="local", params_dtype="fp32"))

    def batches(pack: bool, seq: int, mbs: int) -> list[dict]:
        it = SFTBatchIterator.from_files(toy.train_jsonl, tok, tiling=TilingConfig(tile_size=56, max_tiles=4),
                                         tokens_per_tile=cfg.model.tokens_per_tile, seq_length=seq,
                                         micro_batch_size=mbs, decoder="pillow", pack=pack, shuffle=False,
                                         num_epochs=1)
        out = list(it)
        it.close()
        return out

    packed = batches(True, SEQ, MBS)
    single = batches(False, SEQ, 1)
    with pytest.MonkeyPatch.context() as mp:  # init_parallel sets them for good; later tests need their own port
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        init_parallel(cfg)
        chunks = build_model(cfg)
        yield cfg, chunks, packed, single, tok
        destroy_parallel()


def _segments(batch: dict, pad_id: int) -> list[tuple[str, int, int]]:
    """(source, start, end) of each sample in the flattened batch; padding segments left out."""
    cu, ids = batch["cu_seqlens"].tolist(), batch["input_ids"].reshape(-1)
    spans = [(lo, hi) for lo, hi in zip(cu, cu[1:]) if int(ids[lo]) != pad_id]
    assert len(spans) == len(batch["sample_sources"])
    return [(src, lo, hi) for src, (lo, hi) in zip(batch["sample_sources"], spans)]


def _token_ce(batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy (flattened), times the loss mask."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), reduction="none")
    return ce * batch["loss_mask"].reshape(-1)


def _per_sample(batches: list[dict], logits: list[torch.Tensor], pad_id: int) -> dict[str, tuple]:
    """{source: (summed masked CE, loss tokens, the sample's logits)} over all samples of the batches."""
    out = {}
    for batch, lg in zip(batches, logits):
        ce, mask = _token_ce(batch, lg), batch["loss_mask"].reshape(-1)
        flat = lg.reshape(-1, lg.shape[-1])
        for src, lo, hi in _segments(batch, pad_id):
            out[src] = (float(ce[lo:hi].sum()), float(mask[lo:hi].sum()), flat[lo:hi])
    return out


def test_packed_sample_losses_equal_unpacked(setup):
    """Several image samples per row: per-sample mean loss and the step's token-mean loss equal the unpacked run."""
    from megatron_r1v3.training.step import eval_loss, forward_logits

    cfg, chunks, packed, single, tok = setup
    vocab = cfg.model.language.vocab_size
    assert max(b["num_samples"] for b in packed) >= 3 and all(b["packed"] for b in packed)
    assert any(len([s for s in _segments(b, tok.pad_token_id) if s[1] // SEQ == 0]) >= 2 for b in packed)
    img = cfg.model.image_context_token_id
    for b in packed:  # every packed sample has its image spliced in at its own <IMG_CONTEXT> tokens
        ids = b["input_ids"].reshape(-1)
        assert all(int((ids[lo:hi] == img).sum()) > 0 for _, lo, hi in _segments(b, tok.pad_token_id))
        assert b["pixel_values"].shape[0] == b["num_tiles"] >= b["num_samples"]
    want = _per_sample(single, forward_logits(chunks, single, vocab), tok.pad_token_id)
    got = _per_sample(packed, forward_logits(chunks, packed, vocab), tok.pad_token_id)
    assert set(got) == set(want) and len(got) == 8
    worst = max(abs(got[k][0] / got[k][1] - want[k][0] / want[k][1]) for k in want)
    worst_logit = max(float((got[k][2] - want[k][2]).abs().max()) for k in want)
    print(f"packed vs unpacked: per-sample loss max |diff| = {worst:.2e}, logits max |diff| = {worst_logit:.2e}")
    assert worst <= 1e-5 and worst_logit <= 1e-5
    # the step's own loss (token mean per microbatch, padding and sample ends masked) from the unpacked sums
    expected = []
    for batch in packed:
        sums = [want[src] for src, _, _ in _segments(batch, tok.pad_token_id)]
        expected.append(sum(s[0] for s in sums) / sum(s[1] for s in sums))
    step_loss = eval_loss(chunks, packed)
    assert abs(step_loss - sum(expected) / len(expected)) <= 1e-5, (step_loss, expected)

    # what the step did before packing was honoured (no THD params): samples see the earlier ones in their row
    leaky = [chunks[0](b["input_ids"], pixel_values=b["pixel_values"])[..., :vocab].detach() for b in packed]
    leak = max(abs(v[0] / v[1] - want[k][0] / want[k][1])
               for k, v in _per_sample(packed, leaky, tok.pad_token_id).items())
    print(f"without THD params (before the fix): per-sample loss max |diff| = {leak:.2e}")
    assert leak > 1e-3, leak


def test_packed_gradients_equal_unpacked(setup):
    """Backward through the THD path: the gradient of the summed sample losses equals the unpacked one."""
    from megatron_r1v3.models.packing import packed_seq_params_from_batch

    _, chunks, packed, single, _ = setup
    model = chunks[0]

    def grads(batches: list[dict]) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        for b in batches:
            params = packed_seq_params_from_batch(b)
            logits = model(b["input_ids"], position_ids=b["position_ids"], pixel_values=b["pixel_values"],
                           packed_seq_params=params)
            _token_ce(b, logits).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    g_packed = grads(packed[:1])
    names = set(packed[0]["sample_sources"])
    g_single = grads([b for b in single if b["sample_sources"][0] in names])
    assert set(g_packed) == set(g_single) and any(n.startswith("vision_model.") for n in g_packed)
    worst = max(float((g_packed[n] - g_single[n]).abs().max() / g_single[n].abs().max().clamp(min=1e-12))
                for n in g_packed)
    print(f"packed vs unpacked gradients: max relative |diff| = {worst:.2e}")
    assert worst <= 1e-5
    model.zero_grad(set_to_none=True)


def test_thd_params_are_built_from_the_batch_and_reach_the_attention(setup):
    """What a TE run relies on: qkv_format thd, int32 cu_seqlens on the compute device, max_seqlen an int, the
    same object handed to every layer's core attention; unpacked batches get none."""
    from megatron_r1v3.models.packing import packed_seq_params_from_batch
    from megatron_r1v3.training.step import forward_logits

    cfg, chunks, packed, single, _ = setup
    batch = packed[0]
    assert packed_seq_params_from_batch(single[0]) is None
    meta = packed_seq_params_from_batch(batch, torch.device("meta"))  # the device argument is honoured
    assert meta.cu_seqlens_q.device.type == "meta" and meta.cu_seqlens_q.dtype == torch.int32
    params = packed_seq_params_from_batch(batch, torch.device("cpu"))
    assert params.qkv_format == "thd" and params.cu_seqlens_q is params.cu_seqlens_kv
    assert params.cu_seqlens_q.tolist() == batch["cu_seqlens"].tolist()
    assert params.max_seqlen_q == params.max_seqlen_kv == batch["max_seqlen"] and isinstance(params.max_seqlen_q, int)

    seen = []

    def record(module, args, kwargs):
        seen.append((tuple(args[0].shape), kwargs.get("packed_seq_params")))

    layers = chunks[0].language_model.decoder.layers
    hooks = [layer.self_attention.core_attention.register_forward_pre_hook(record, with_kwargs=True)
             for layer in layers]
    try:
        forward_logits(chunks, [batch], cfg.model.language.vocab_size)
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == len(layers)
    lm = cfg.model.language
    for shape, got in seen:  # THD: [b*s tokens, heads, head_dim], one row
        assert shape == (MBS * SEQ, lm.num_heads, lm.head_dim) and got is seen[0][1]
        assert got.qkv_format == "thd" and got.cu_seqlens_q.tolist() == batch["cu_seqlens"].tolist()


def test_block_diagonal_mask_and_megatron_local_attention_refusing_thd(setup):
    """The mask a token may not look through: other segments and its own future; megatron's plain local attention
    refuses THD (why the local spec converts it)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megatron_r1v3.models.packing import block_diagonal_causal_mask

    _, chunks, packed, _, _ = setup
    mask = block_diagonal_causal_mask(torch.tensor([0, 2, 5], dtype=torch.int32), 5)[0, 0]
    visible = [[j for j in range(5) if not mask[i, j]] for i in range(5)]
    assert visible == [[0], [0, 1], [2], [2, 3], [2, 3, 4]]
    core = chunks[0].language_model.decoder.layers[0].self_attention.core_attention
    assert isinstance(core, DotProductAttention)
    from megatron_r1v3.models.packing import packed_seq_params_from_batch

    params = packed_seq_params_from_batch(packed[0])
    q = torch.zeros(MBS * SEQ, core.num_attention_heads_per_partition, core.hidden_size_per_attention_head)
    with pytest.raises(AssertionError, match="Packed sequence is not supported"):
        DotProductAttention.forward(core, q, q, q, None, packed_seq_params=params)


def _broken(batch: dict, **changes) -> dict:
    return {**batch, **changes}


def test_bad_packed_batches_are_refused_with_the_field_named(setup):
    from megatron_r1v3.models.packing import PackedBatchError, packed_seq_params_from_batch
    from megatron_r1v3.training.step import forward_logits

    cfg, chunks, packed, single, _ = setup
    good = packed[0]
    cu = good["cu_seqlens"]
    with pytest.raises(PackedBatchError, match=r"cu_seqlens must rise strictly from 0 to b\*s=512"):
        packed_seq_params_from_batch(_broken(good, cu_seqlens=cu[:-1]))
    with pytest.raises(PackedBatchError, match="max_seqlen=3 but the longest"):
        packed_seq_params_from_batch(_broken(good, max_seqlen=3))
    positions = torch.arange(SEQ).repeat(MBS, 1)  # positions running on across samples
    with pytest.raises(PackedBatchError, match=r"position_ids\[0, \d+\] = \d+, expected 0"):
        packed_seq_params_from_batch(_broken(good, position_ids=positions))
    end = int(cu[1]) - 1
    mask = good["loss_mask"].clone()
    mask.view(-1)[end] = 1.0
    with pytest.raises(PackedBatchError, match=rf"loss_mask\[0, {end}\] is set on the last token of a segment"):
        packed_seq_params_from_batch(_broken(good, loss_mask=mask))
    mixed = [good, _broken(good, packed=False)]
    with pytest.raises(ValueError, match="microbatch 1 has packed=False, microbatch 0 packed=True"):
        forward_logits(chunks, mixed, cfg.model.language.vocab_size)
    assert dataclasses.is_dataclass(packed_seq_params_from_batch(good))
