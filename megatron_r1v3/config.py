"""Every knob of a run as OmegaConf-structured dataclasses, loaded from YAML with `key=value` overrides.

One `RunConfig` holds the model, parallel, precision and optimizer sections. Presets (`model.preset`) fill the
model section; the YAML and command-line overrides are merged on top, then `validate()` rejects impossible
combinations at start with a message that names the fields involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending fields."""


@dataclass
class VisionConfig:
    """InternViT encoder shape (spec §1)."""

    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 3200
    num_layers: int = 45
    num_heads: int = 25
    ffn_hidden_size: int = 12800
    norm_eps: float = 1e-6
    layer_scale_init: float = 0.1
    qk_normalization: bool = True
    # Heads are zero-padded up to a multiple of this (25 -> 32) whenever num_heads is not one already. It is a
    # model property, not derived from TP, so a checkpoint saved at one TP loads at another (NVLM recipe).
    head_pad_multiple: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def padded_heads(self) -> int:
        m = max(1, self.head_pad_multiple)
        return int(math.ceil(self.num_heads / m) * m)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ConnectorConfig:
    """Pixel-shuffle MLP projector `mlp1` (LayerNorm -> Linear -> GELU -> Linear)."""

    downsample_ratio: float = 0.5
    norm_eps: float = 1e-5


@dataclass
class LanguageConfig:
    """Qwen2.5 decoder shape (spec §1)."""

    num_layers: int = 64
    hidden_size: int = 5120
    ffn_hidden_size: int = 27648
    num_heads: int = 40
    num_kv_heads: int = 8
    vocab_size: int = 151674
    max_position_embeddings: int = 32768
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    make_vocab_size_divisible_by: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """The whole VLM: encoder, connector, decoder, and the special token ids the splice relies on."""

    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    image_context_token_id: int = 151667
    image_start_token_id: int = 151665
    image_end_token_id: int = 151666
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    activation_recompute: bool = False

    @property
    def tokens_per_tile(self) -> int:
        side = int(self.vision.grid * self.connector.downsample_ratio)
        return side * side


@dataclass
class ParallelConfig:
    """Process layout. data_parallel is derived from the world size (-1) or checked against it."""

    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    context: int = 1
    data: int = -1
    sequence_parallel: bool = False
    # Fewer decoder layers on stage 0 balances the ViT sitting there (megatron num_layers_in_first_pipeline_stage).
    decoder_layers_in_first_stage: Optional[int] = None
    backend: str = "auto"  # auto | nccl | gloo
    launcher: str = "auto"  # auto | torchrun | slurm | none
    timeout_s: int = 600


@dataclass
class PrecisionConfig:
    """Parameter dtype and Transformer Engine FP8 settings (FP8 needs TE; asking without it fails at start)."""

    params_dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    fp8: Optional[str] = None  # None | hybrid | e4m3
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"  # max | most_recent
    fp8_margin: int = 0
    transformer_impl: str = "auto"  # auto (TE when importable) | transformer_engine | local


@dataclass
class OptimizerConfig:
    """Megatron optimizer settings (Adam by default, distributed optimizer on)."""

    name: str = "adam"  # adam | sgd
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    warmup_fraction: float = 0.03
    lr_decay_style: str = "cosine"


@dataclass
class DataConfig:
    """Where samples come from and how they are turned into microbatches."""

    train: list[str] = field(default_factory=list)  # JSONL / Parquet files
    val: list[str] = field(default_factory=list)
    root: Optional[str] = None  # image paths in JSONL are relative to this (default: the file's folder)
    tokenizer: Optional[str] = None  # HF tokenizer dir; None = the embedded toy tokenizer (tiny preset)
    toy_dir: Optional[str] = None  # generate the embedded toy task here when `train` is empty
    toy_train: int = 512
    toy_val: int = 64
    toy_wrong_fraction: float = 0.0  # share of SFT traces that end in a wrong answer (leaves room for RL)
    toy_tasks: list[str] = field(default_factory=lambda: ["colour_mc", "shape_word", "count_number", "count_mc",
                                                          "digit_number"])  # + colour_word (data/synthetic.py)
    toy_kind: str = "sft"  # sft: reasoning traces | pretrain: captions of the same images | mixed: both
    decoder: str = "dali"  # dali | pillow
    decode_threads: int = 2
    max_tiles: int = 12
    use_thumbnail: bool = True
    seq_length: int = 4096
    pack: bool = False
    strict: bool = False  # true: a bad sample stops the run; false: skipped, counted, logged with file:line


@dataclass
class TrainConfig:
    """Supervised fine-tuning loop (cold-start SFT and connector-only tuning)."""

    trainable: str = "full"  # full | connector_only | freeze_vision | comma-separated regexes
    steps: int = 100  # optimizer steps
    global_batch_size: int = 64
    micro_batch_size: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    early_stop_patience: int = 0  # evaluations without val-loss improvement before stopping (0 = off)
    log_every: int = 1
    heldout_samples: int = 0  # after training: greedy answers on this many val samples (tiny models; 0 = off)


@dataclass
class CheckpointConfig:
    """Atomic dist_checkpointing saves with a `latest` pointer; resume restores everything."""

    dir: Optional[str] = None  # default: <output_dir>/checkpoints
    save_every: int = 0  # steps; 0 = only at the end
    keep_last: int = 2
    resume: bool = True  # continue from `latest` when it exists
    load: Optional[str] = None  # initial weights: a megatron_r1v3 checkpoint dir (converted or trained)


@dataclass
class LoggingConfig:
    """TensorBoard event files and console progress."""

    tensorboard: bool = True
    progress: bool = True


@dataclass
class DemoConfig:
    """Settings of `r1v3 train-step` (the parallel training-step demo)."""

    steps: int = 3
    micro_batch_size: int = 2
    num_microbatches: int = 2
    seq_length: int = 64
    tiles_per_sample: int = 2


@dataclass
class RLConfig:
    """GRPO as R1V3 runs it (defaults = the report's, spec section 3). Optimizer steps, trainable set, micro-batch
    size and logging cadence come from `train`; one optimizer step per episode."""

    prompts_per_step: int = 32
    samples_per_prompt: int = 32  # G
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_tokens: int = 4096
    length_schedule: list[list[int]] = field(default_factory=list)  # [[step, tokens], ...]: from `step` on, `tokens`
    eps_low: float = 0.2
    eps_high: float = 0.2  # > eps_low = clip-higher (DAPO)
    old_logprobs: str = "recompute"  # recompute (trainer forward before the update, as verl) | rollout (vLLM's)
    agg: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    kl_coef: float = 0.0  # > 0: k3 KL to a frozen copy of the initial policy
    entropy_coef: float = 0.0
    w_acc: float = 0.8
    w_fmt: float = 0.2
    verifier_model: Optional[str] = None  # HF chat model dir for the LLM answer judge (second vLLM engine); off
    std_unbiased: bool = True
    normalize_std: bool = True
    dynamic_sampling: bool = False  # DAPO: train only on groups whose rewards differ; re-sample to fill
    dynamic_sampling_rounds: int = 3  # extra generation rounds at most when filling
    ssb: bool = True  # R1V2 selective sample buffer
    ssb_capacity: int = 1024
    ssb_zero_variance_threshold: float = 0.5
    ssb_max_replay_fraction: float = 0.25
    ssb_max_age: int = 8
    critical_tokens: list[str] = field(default_factory=lambda: ["wait", "alternatively", "hmm"])
    eval_every: int = 0  # held-out accuracy with vLLM every N steps (0 = at start and end only)
    eval_prompts: int = 64
    eval_samples: int = 4  # avg@k
    eval_temperature: float = 1.0
    refit_bucket_mb: int = 512
    kv_cache_mb: int = 256  # vLLM-CPU KV cache
    gpu_memory_utilization: float = 0.5  # vLLM on GPU (colocated: leave room for the trainer)
    max_prompt_tokens: int = 1024  # after image expansion; longer prompts are skipped and counted


@dataclass
class RunConfig:
    """Root of every recipe."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 1234
    output_dir: str = "runs/default"


def padded_vocab_size(vocab: int, multiple: int, tp: int) -> int:
    """Vocab rounded up to `multiple` (independent of TP so checkpoints reshard); must split evenly over TP."""
    padded = -(-vocab // multiple) * multiple
    if padded % tp:
        raise ConfigError(
            f"padded vocab {padded} (model.language.vocab_size={vocab}, make_vocab_size_divisible_by={multiple})"
            f" does not split over parallel.tensor={tp}"
        )
    return padded


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Preset, then YAML, then `key=value` overrides; returns a typed RunConfig (not yet validated)."""
    from megatron_r1v3.models.presets import get_preset

    layers = [OmegaConf.load(str(path))] if path else []
    layers.append(OmegaConf.from_dotlist(list(overrides or [])))
    merged_user = OmegaConf.merge(*layers) if layers else OmegaConf.create()
    preset = OmegaConf.select(merged_user, "model.preset", default="tiny")
    base = OmegaConf.structured(RunConfig(model=get_preset(preset)))
    try:
        cfg = OmegaConf.merge(base, merged_user)
    except Exception as exc:  # omegaconf names the key in its message
        raise ConfigError(f"invalid config ({path or 'overrides'}): {exc}") from exc
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written next to every checkpoint and run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def validate(cfg: RunConfig, world_size: int, te_available: bool = False) -> RunConfig:
    """Check the run can start; fills `parallel.data`. Errors name every field involved."""
    p, lm, vit = cfg.parallel, cfg.model.language, cfg.model.vision
    errors: list[str] = []
    for name in ("tensor", "pipeline", "context"):
        if getattr(p, name) < 1:
            errors.append(f"parallel.{name}={getattr(p, name)} must be >= 1")
    if errors:
        raise ConfigError("; ".join(errors))
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by parallel.tensor*parallel.pipeline*parallel.context"
            f" = {p.tensor}*{p.pipeline}*{p.context} = {model_parallel}"
        )
    else:
        dp = world_size // model_parallel
        if p.data not in (-1, dp):
            errors.append(f"parallel.data={p.data} but world size {world_size} / (tensor*pipeline*context) = {dp}")
        p.data = dp
    if lm.num_heads % lm.num_kv_heads:
        errors.append(f"model.language.num_heads={lm.num_heads} not divisible by num_kv_heads={lm.num_kv_heads}")
    if lm.num_kv_heads % p.tensor:
        errors.append(
            f"parallel.tensor={p.tensor} does not divide model.language.num_kv_heads={lm.num_kv_heads} (KV groups)"
        )
    if lm.ffn_hidden_size % p.tensor:
        errors.append(f"parallel.tensor={p.tensor} does not divide model.language.ffn_hidden_size={lm.ffn_hidden_size}")
    if vit.hidden_size % vit.num_heads:
        errors.append(f"model.vision.hidden_size={vit.hidden_size} not divisible by num_heads={vit.num_heads}")
    if vit.padded_heads % p.tensor:
        errors.append(
            f"parallel.tensor={p.tensor} does not divide the padded ViT heads {vit.padded_heads}"
            f" (model.vision.num_heads={vit.num_heads}, head_pad_multiple={vit.head_pad_multiple})"
        )
    if vit.ffn_hidden_size % p.tensor:
        errors.append(f"parallel.tensor={p.tensor} does not divide model.vision.ffn_hidden_size={vit.ffn_hidden_size}")
    if vit.image_size % vit.patch_size:
        errors.append(f"model.vision.image_size={vit.image_size} not divisible by patch_size={vit.patch_size}")
    _check_pipeline(cfg, errors)
    prec = cfg.precision
    if prec.fp8 is not None:
        if prec.fp8 not in ("hybrid", "e4m3"):
            errors.append(f"precision.fp8={prec.fp8!r} must be null, 'hybrid' or 'e4m3'")
        if prec.fp8_recipe not in ("delayed", "tensorwise", "blockwise"):
            errors.append(f"precision.fp8_recipe={prec.fp8_recipe!r} must be delayed, tensorwise or blockwise")
        if not te_available or prec.transformer_impl == "local":
            errors.append(
                f"precision.fp8={prec.fp8!r} needs Transformer Engine layers, but "
                + ("precision.transformer_impl='local'" if te_available else "transformer_engine is not importable")
                + " (install the `gpu` extra on a CUDA machine, or set precision.fp8=null)"
            )
    if prec.transformer_impl == "transformer_engine" and not te_available:
        errors.append("precision.transformer_impl='transformer_engine' but transformer_engine is not importable")
    if (p.sequence_parallel or p.context > 1) and not te_available:
        errors.append(
            f"parallel.sequence_parallel={p.sequence_parallel} / parallel.context={p.context} need Transformer"
            " Engine attention and norms, which are not importable here"
        )
    if prec.params_dtype not in ("auto", "fp32", "bf16", "fp16"):
        errors.append(f"precision.params_dtype={prec.params_dtype!r} must be auto, fp32, bf16 or fp16")
    if cfg.optimizer.min_lr > cfg.optimizer.lr:
        errors.append(f"optimizer.min_lr={cfg.optimizer.min_lr} > optimizer.lr={cfg.optimizer.lr}")
    if cfg.optimizer.name not in ("adam", "sgd"):
        errors.append(f"optimizer.name={cfg.optimizer.name!r} must be adam or sgd")
    elif cfg.optimizer.name == "sgd" and cfg.optimizer.use_distributed_optimizer:
        errors.append("optimizer.name='sgd' cannot use optimizer.use_distributed_optimizer=true (megatron: Adam only)")
    _check_train(cfg, errors)
    _check_rl(cfg, errors)
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))
    return cfg


def _check_train(cfg: RunConfig, errors: list[str]) -> None:
    t, d = cfg.train, cfg.data
    dp = cfg.parallel.data if cfg.parallel.data > 0 else 1
    if t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    from megatron_r1v3.data.synthetic import TASKS

    unknown = [t for t in d.toy_tasks if t not in TASKS]
    if unknown or not d.toy_tasks:
        errors.append(f"data.toy_tasks={list(d.toy_tasks)} must be a non-empty subset of {list(TASKS)}")
    if d.toy_kind not in ("sft", "pretrain", "mixed"):
        errors.append(f"data.toy_kind={d.toy_kind!r} must be sft, pretrain or mixed")
    if d.decoder not in ("dali", "pillow"):
        errors.append(f"data.decoder={d.decoder!r} must be dali or pillow")
    if d.seq_length > cfg.model.language.max_position_embeddings:
        errors.append(
            f"data.seq_length={d.seq_length} > model.language.max_position_embeddings="
            f"{cfg.model.language.max_position_embeddings}"
        )


def _check_rl(cfg: RunConfig, errors: list[str]) -> None:
    r = cfg.rl
    if r.agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        errors.append(f"rl.agg={r.agg!r} must be token-mean, seq-mean-token-mean or seq-mean-token-sum")
    if r.old_logprobs not in ("recompute", "rollout"):
        errors.append(f"rl.old_logprobs={r.old_logprobs!r} must be recompute or rollout")
    if r.prompts_per_step < 1 or r.samples_per_prompt < 2:
        errors.append(f"rl.prompts_per_step={r.prompts_per_step} must be >= 1 and rl.samples_per_prompt="
                      f"{r.samples_per_prompt} >= 2 (a group of one has no advantage)")
    if not (0 <= r.eps_low < 1 and r.eps_high >= 0):
        errors.append(f"rl.eps_low={r.eps_low} must lie in [0, 1) and rl.eps_high={r.eps_high} be >= 0")
    for i, entry in enumerate(r.length_schedule):
        if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
            errors.append(f"rl.length_schedule[{i}]={list(entry)} must be [step >= 0, tokens >= 1]")


def _check_pipeline(cfg: RunConfig, errors: list[str]) -> None:
    p, lm = cfg.parallel, cfg.model.language
    if p.pipeline > lm.num_layers:
        errors.append(f"parallel.pipeline={p.pipeline} > model.language.num_layers={lm.num_layers}")
        return
    vpp = p.virtual_pipeline or 1
    if p.virtual_pipeline is not None and p.pipeline < 2:
        errors.append(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline >= 2")
    layers, stages = lm.num_layers, p.pipeline
    first = p.decoder_layers_in_first_stage
    if first is not None:
        if p.pipeline < 2 or not 0 < first < layers:
            errors.append(
                f"parallel.decoder_layers_in_first_stage={first} needs parallel.pipeline >= 2 and"
                f" 0 < value < model.language.num_layers={layers}"
            )
            return
        if vpp > 1:
            errors.append("parallel.decoder_layers_in_first_stage cannot be combined with parallel.virtual_pipeline")
        layers, stages = layers - first, stages - 1
    if layers % (stages * vpp):
        errors.append(
            f"model.language.num_layers={lm.num_layers} does not split evenly over parallel.pipeline={p.pipeline}"
            + (f" x parallel.virtual_pipeline={vpp}" if vpp > 1 else "")
            + (f" with decoder_layers_in_first_stage={first}" if first is not None else "")
        )


def as_dict(cfg: Any) -> dict:
    """Plain-dict view of any config dataclass (for logging and metadata files)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


__all__ = [
    "MISSING",
    "ConfigError",
    "CheckpointConfig",
    "ConnectorConfig",
    "DataConfig",
    "DemoConfig",
    "LoggingConfig",
    "TrainConfig",
    "LanguageConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrecisionConfig",
    "RLConfig",
    "RunConfig",
    "VisionConfig",
    "as_dict",
    "load_config",
    "to_yaml",
    "validate",
]
