"""Checkpoints written by transformers itself (not by our writer): `InternVLForConditionalGeneration.save_pretrained`
stores the checkpoint names (`language_model.model.*`, `language_model.lm_head.weight`, `vision_tower.*`,
`multi_modal_projector.*`). They convert, match transformers' logits at TP2·PP2 and round-trip tensor for tensor."""

import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from megatron_r1v3.bridge.hf_io import HFCheckpoint, HFFormatError, canonical_name, hf_config_from_model
from megatron_r1v3.presets import tiny

pytestmark = pytest.mark.multiprocess


def r1v3(*args):
    out = subprocess.run([sys.executable, "-m", "megatron_r1v3.cli", *map(str, args)], capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random tiny InternVL (3 ViT heads, GQA, vocab 1000) saved by transformers' own save_pretrained."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    m = tiny()
    m.vision.hidden_size, m.vision.num_heads = 48, 3
    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig.from_dict(hf_config_from_model(m, "native", torch.float32)))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)  # transformers' init leaves layer scales / norms constant: make every tensor count
    out = tmp_path_factory.mktemp("tf") / "hf"
    model.save_pretrained(out)
    return out, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_transformers_writes_checkpoint_names_and_we_read_them(saved):
    hf_dir, state = saved
    with safe_open(str(hf_dir / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert "language_model.model.embed_tokens.weight" in stored and "lm_head.weight" not in stored
    ckpt = HFCheckpoint(hf_dir)
    assert sorted(ckpt.names()) == sorted(state)  # canonical = transformers' in-memory names
    for name in state:
        assert torch.equal(ckpt.get(name), state[name]), name
    assert canonical_name("vision_model.encoder.layers.0.ls1", "remote") == "vision_model.encoder.layers.0.ls1"


def test_transformers_checkpoint_converts_matches_logits_and_round_trips(saved, tmp_path):
    hf_dir, state = saved
    meg, back = tmp_path / "meg", tmp_path / "back"
    r1v3("convert", "hf-to-megatron", "--hf", hf_dir, "--out", meg, "--tp", 2, "--pp", 2)
    line = r1v3("compare-hf", "--hf", hf_dir, "--megatron", meg, "--tp", 2, "--pp", 2).strip().splitlines()[-1]
    diff = float(re.fullmatch(r"max_abs_logit_diff=(\S+)", line).group(1))
    print(f"transformers-saved checkpoint at TP2·PP2: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5
    r1v3("convert", "megatron-to-hf", "--weights-only", "--megatron", meg, "--out", back, "--tp", 2, "--pp", 2)
    exported = HFCheckpoint(back)
    assert sorted(exported.names()) == sorted(state)
    for name in state:
        assert torch.equal(exported.get(name), state[name]), name
    # written the way transformers writes it: the same stored names as its own save_pretrained, and it loads them
    assert _stored_keys(back) == _stored_keys(hf_dir)
    from transformers import InternVLForConditionalGeneration

    _, info = InternVLForConditionalGeneration.from_pretrained(back, output_loading_info=True)
    assert not any(info.values()), info


def _stored_keys(hf_dir):
    keys = set()
    for f in hf_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as handle:
            keys |= set(handle.keys())
    return keys


def test_a_tensor_stored_under_both_spellings_is_named(saved, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    hf_dir, _ = saved
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.language_model.norm.weight"] = tensors["language_model.model.norm.weight"].clone()
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(HFFormatError, match="model.language_model.norm.weight.*stored twice"):
        HFCheckpoint(bad)


def test_conversion_checks_the_checkpoint_not_training_defaults(tmp_path):
    """A valid checkpoint with 1024 positions (below the training default data.seq_length=4096) converts both ways
    and compares (the converter used to refuse it naming data.seq_length)."""
    from megatron_r1v3.bridge.random_hf import write_random_hf_checkpoint

    m = tiny()
    m.language.max_position_embeddings = 1024
    hf = write_random_hf_checkpoint(tmp_path / "hf", m, "native")
    r1v3("convert", "hf-to-megatron", "--hf", hf, "--out", tmp_path / "meg")
    r1v3("convert", "megatron-to-hf", "--weights-only", "--megatron", tmp_path / "meg", "--out", tmp_path / "back")
    line = r1v3("compare-hf", "--hf", hf, "--megatron", tmp_path / "meg").strip().splitlines()[-1]
    diff = float(re.fullmatch(r"max_abs_logit_diff=(\S+)", line).group(1))
    print(f"1024-position checkpoint at TP1·PP1: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-5


def test_a_recipe_that_disagrees_with_the_checkpoint_model_is_named(tmp_path):
    """Training from a converted checkpoint reads its model config (r1v3_meta.json): a recipe of another shape is
    refused naming each field; padding multiples compare by what they pad to."""
    from megatron_r1v3.bridge.convert import check_checkpoint_model
    from megatron_r1v3.bridge.random_hf import write_random_hf_checkpoint
    from megatron_r1v3.config import ConfigError

    hf = write_random_hf_checkpoint(tmp_path / "hf", tiny(), "native")
    r1v3("convert", "hf-to-megatron", "--hf", hf, "--out", tmp_path / "meg")
    same = tiny()  # the converter pads 4 ViT heads to 8 (the tiny preset: to 4)
    same.vision.head_pad_multiple = 8
    check_checkpoint_model(same, tmp_path / "meg")
    same.vision.head_pad_multiple = 2
    with pytest.raises(ConfigError, match=r"model.vision.padded_heads=4 but the checkpoint has 8"):
        check_checkpoint_model(same, tmp_path / "meg")
    other = tiny()
    other.language.num_layers, other.vision.head_pad_multiple, other.image_context_token_id = 6, 8, 7
    with pytest.raises(ConfigError) as err:
        check_checkpoint_model(other, tmp_path / "meg")
    assert "model.language.num_layers=6 but the checkpoint has 4" in str(err.value)
    assert "model.image_context_token_id=7 but the checkpoint has 5" in str(err.value)
