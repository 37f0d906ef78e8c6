"""Every knob of a run as OmegaConf-structured dataclasses: the bottom layer, importing nothing of the package.

One `RunConfig` holds ten sections: model, parallel, precision, optimizer, demo, data, train, checkpoint, rl and
logging. `presets.load_config` fills it (preset, then YAML, then `key=value` overrides); `field_errors` checks the
fields by themselves, and `parallel.layout.plan_layout` checks the whole run against a world size, naming every
field involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending fields."""


# Dtype names used in configs, checkpoint metadata and the scaling model: name -> (torch attribute, bytes).
DTYPES = {"fp32": ("float32", 4), "bf16": ("bfloat16", 2), "fp16": ("float16", 2)}


def torch_dtype(name: str):
    """`fp32|bf16|fp16` -> the torch dtype (torch is imported only here, not by loading a config)."""
    import torch

    if name not in DTYPES:
        raise ConfigError(f"unknown dtype name {name!r}; known: {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[name][0])


def dtype_name(dtype) -> str:
    """A torch dtype -> its config name (`torch.bfloat16` -> `bf16`)."""
    attr = str(dtype).replace("torch.", "")
    for name, (torch_attr, _) in DTYPES.items():
        if torch_attr == attr:
            return name
    raise ConfigError(f"dtype {dtype} has no config name; supported: {', '.join(DTYPES)}")


def dtype_bytes(name: str) -> int:
    return DTYPES[name][1]


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

    @property
    def padded_vocab_size(self) -> int:
        """The vocab the model allocates: rounded up to `make_vocab_size_divisible_by`, independent of TP so
        checkpoints reshard (TP must divide it: `parallel.layout`). Rows past `vocab_size` are masked to -inf."""
        m = max(1, self.make_vocab_size_divisible_by)
        return -(-self.vocab_size // m) * m


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
    toy_reflect_fraction: float = 0.0  # share of traces with a reasoning move ("Wait, ...", data/synthetic.py)
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
    # importance correction of the engine-vs-trainer mismatch (and of buffer replays' older policy), per token with
    # w = pi_old_train / pi_rollout: none | tis (weight min(w, cap)) | mis (drop tokens outside [1/cap, cap])
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0
    # > 0: the episode's microbatches hold as many consecutive rows as fit this many tokens, each padded to its own
    # longest row (train.micro_batch_size rows at most); 0: train.micro_batch_size rows padded to the episode's longest
    micro_batch_tokens: int = 0
    share_vision: bool = True  # a group's rows share one ViT + connector forward of their image set (rl/batch.py)
    agg: str = "seq-mean-token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    kl_coef: float = 0.0  # > 0: k3 KL to a frozen copy of the initial policy
    entropy_coef: float = 0.0
    w_acc: float = 0.8
    w_fmt: float = 0.2
    reward_workers: int = 4  # processes scoring rewards (rl/scoring.py); 0 = in the trainer's process
    reward_timeout_s: float = 10.0  # per response; over it (or hostile: NUL bytes, huge box) it scores 0, counted
    verifier_model: Optional[str] = None  # HF chat model dir for the LLM answer judge (second vLLM engine); off
    std_unbiased: bool = True
    normalize_std: bool = True
    dynamic_sampling: bool = False  # DAPO: train only on groups whose rewards differ; re-sample to fill
    dynamic_sampling_rounds: int = 3  # extra generation rounds at most when filling
    curriculum: str = "none"  # none (shuffled epochs) | easy_to_hard (each epoch sorted by meta.difficulty)
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
    eval_blank_images: bool = False  # `r1v3 eval --blank-images`: the blind control (white images, same sizes)
    refit_bucket_mb: int = 512
    kv_cache_mb: int = 256  # vLLM-CPU KV cache
    gpu_memory_utilization: float = 0.5  # vLLM on GPU (colocated: leave room for the trainer)
    rollout_dtype: str = "auto"  # vLLM's weights/activations: auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    # 0: one vLLM engine in-process on rank 0 (TP1). N >= 1: SPMD engines, world/N of them, each over N consecutive
    # ranks (vLLM external launcher), dummy start, per-engine-rank freeze-aware refit (rollout/engine_group.py)
    rollout_tp: int = 0
    # after image expansion; longer prompts are skipped, counted and named (never sent to vLLM). None: one
    # full-tile image plus PROMPT_TEXT_TOKENS of text (`prompt_token_budget`: 4,354 for the 38B at 12 tiles)
    max_prompt_tokens: Optional[int] = None
    pixel_cache_mb: int = 1024  # per process and prompt set: LRU cache of prompt tiles (held-out prompts, replays)


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


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (written next to every checkpoint and run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_errors(cfg: RunConfig) -> list[str]:
    """What is wrong with the config by itself (names, ranges, model consistency); the layout rules that need a
    world size live in `parallel.layout`, which also calls this. Nothing is modified."""
    errors: list[str] = []
    lm, vit = cfg.model.language, cfg.model.vision
    if lm.num_heads % lm.num_kv_heads:
        errors.append(f"model.language.num_heads={lm.num_heads} not divisible by num_kv_heads={lm.num_kv_heads}")
    if vit.hidden_size % vit.num_heads:
        errors.append(f"model.vision.hidden_size={vit.hidden_size} not divisible by num_heads={vit.num_heads}")
    if vit.image_size % vit.patch_size:
        errors.append(f"model.vision.image_size={vit.image_size} not divisible by patch_size={vit.patch_size}")
    prec = cfg.precision
    if prec.fp8 is not None:
        if prec.fp8 not in ("hybrid", "e4m3"):
            errors.append(f"precision.fp8={prec.fp8!r} must be null, 'hybrid' or 'e4m3'")
        if prec.fp8_recipe not in ("delayed", "tensorwise", "blockwise"):
            errors.append(f"precision.fp8_recipe={prec.fp8_recipe!r} must be delayed, tensorwise or blockwise")
    if prec.params_dtype != "auto" and prec.params_dtype not in DTYPES:
        errors.append(f"precision.params_dtype={prec.params_dtype!r} must be auto, {', '.join(DTYPES)}")
    if prec.transformer_impl not in ("auto", "transformer_engine", "local"):
        errors.append(f"precision.transformer_impl={prec.transformer_impl!r} must be auto, transformer_engine or local")
    o = cfg.optimizer
    if o.min_lr > o.lr:
        errors.append(f"optimizer.min_lr={o.min_lr} > optimizer.lr={o.lr}")
    if o.name not in ("adam", "sgd"):
        errors.append(f"optimizer.name={o.name!r} must be adam or sgd")
    elif o.name == "sgd" and o.use_distributed_optimizer:
        errors.append("optimizer.name='sgd' cannot use optimizer.use_distributed_optimizer=true (megatron: Adam only)")
    d = cfg.data
    if d.toy_kind not in ("sft", "pretrain", "mixed"):
        errors.append(f"data.toy_kind={d.toy_kind!r} must be sft, pretrain or mixed")
    if d.decoder not in ("dali", "pillow"):
        errors.append(f"data.decoder={d.decoder!r} must be dali or pillow")
    return errors + _rl_errors(cfg.rl) + _prompt_budget_errors(cfg)


def validate(cfg: RunConfig) -> RunConfig:
    """Raise one ConfigError naming every field `field_errors` finds; returns `cfg` unchanged."""
    errors = field_errors(cfg)
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(errors))
    return cfg


PROMPT_TEXT_TOKENS = 1024  # text room of the derived rl.max_prompt_tokens (template, question, options)
PROMPT_TEXT_MIN = 64  # an explicit rl.max_prompt_tokens leaves at least this much text beside a full-tile image


def full_image_tokens(cfg: RunConfig) -> int:
    """Prompt tokens of one image at `data.max_tiles`: the tiles, the thumbnail the engine's processor adds to any
    multi-tile image, `tokens_per_tile` each, plus `<img>`/`</img>` (3,330 for the 38B at 12 tiles)."""
    tiles = cfg.data.max_tiles + (1 if cfg.data.max_tiles > 1 else 0)
    return tiles * cfg.model.tokens_per_tile + 2


def prompt_token_budget(cfg: RunConfig) -> int:
    """`rl.max_prompt_tokens`, or when unset one full-tile image plus PROMPT_TEXT_TOKENS of text."""
    if cfg.rl.max_prompt_tokens is not None:
        return cfg.rl.max_prompt_tokens
    return full_image_tokens(cfg) + PROMPT_TEXT_TOKENS


def _prompt_budget_errors(cfg: RunConfig) -> list[str]:
    """A set `rl.max_prompt_tokens` must hold one full-tile prompt, else every large image would be skipped."""
    budget = cfg.rl.max_prompt_tokens
    if budget is None:
        return []
    need = full_image_tokens(cfg) + PROMPT_TEXT_MIN
    if budget < need:
        return [f"rl.max_prompt_tokens={budget} cannot hold one full-tile prompt: data.max_tiles="
                f"{cfg.data.max_tiles} (+1 thumbnail) x {cfg.model.tokens_per_tile} tokens per tile (model.vision"
                f".image_size/patch_size, model.connector.downsample_ratio) + 2 = {full_image_tokens(cfg)} image"
                f" tokens, plus {PROMPT_TEXT_MIN} of text = {need}; raise it or leave it unset (derived:"
                f" {full_image_tokens(cfg) + PROMPT_TEXT_TOKENS})"]
    return []


def _rl_errors(r: RLConfig) -> list[str]:
    errors = []
    if r.agg not in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        errors.append(f"rl.agg={r.agg!r} must be token-mean, seq-mean-token-mean or seq-mean-token-sum")
    if r.old_logprobs not in ("recompute", "rollout"):
        errors.append(f"rl.old_logprobs={r.old_logprobs!r} must be recompute or rollout")
    if r.rollout_correction not in ("none", "tis", "mis"):
        errors.append(f"rl.rollout_correction={r.rollout_correction!r} must be none, tis or mis")
    elif r.rollout_correction != "none" and r.old_logprobs != "recompute":
        errors.append(f"rl.rollout_correction={r.rollout_correction} needs rl.old_logprobs=recompute (with"
                      f" old_logprobs={r.old_logprobs} pi_old is the engine's own and every weight is 1)")
    if r.micro_batch_tokens < 0:
        errors.append(f"rl.micro_batch_tokens={r.micro_batch_tokens} must be >= 0 (0: train.micro_batch_size rows)")
    if r.rollout_correction_cap <= 1.0:
        errors.append(f"rl.rollout_correction_cap={r.rollout_correction_cap} must be > 1")
    if r.rollout_dtype not in ("auto", "fp32", "bf16"):
        errors.append(f"rl.rollout_dtype={r.rollout_dtype!r} must be auto, fp32 or bf16")
    if r.curriculum not in ("none", "easy_to_hard"):
        errors.append(f"rl.curriculum={r.curriculum!r} must be none or easy_to_hard")
    if r.rollout_tp < 0:
        errors.append(f"rl.rollout_tp={r.rollout_tp} must be 0 (one engine on rank 0) or the engines' TP size >= 1")
    if r.prompts_per_step < 1 or r.samples_per_prompt < 2:
        errors.append(f"rl.prompts_per_step={r.prompts_per_step} must be >= 1 and rl.samples_per_prompt="
                      f"{r.samples_per_prompt} >= 2 (a group of one has no advantage)")
    if not (0 <= r.eps_low < 1 and r.eps_high >= 0):
        errors.append(f"rl.eps_low={r.eps_low} must lie in [0, 1) and rl.eps_high={r.eps_high} be >= 0")
    for i, entry in enumerate(r.length_schedule):
        if len(entry) != 2 or entry[0] < 0 or entry[1] < 1:
            errors.append(f"rl.length_schedule[{i}]={list(entry)} must be [step >= 0, tokens >= 1]")
    return errors


def as_dict(cfg: Any) -> dict:
    """Plain-dict view of any config dataclass (for logging and metadata files)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


__all__ = [
    "MISSING",
    "ConfigError",
    "DTYPES",
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
    "dtype_bytes",
    "dtype_name",
    "field_errors",
    "full_image_tokens",
    "prompt_token_budget",
    "to_yaml",
    "torch_dtype",
    "validate",
]
