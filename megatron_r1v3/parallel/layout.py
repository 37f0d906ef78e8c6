"""The parallel layout of a run, decided in one place: TP/PP/VPP/CP/DP degrees and every rule they must satisfy.

`plan_layout(cfg, world_size, te_available)` is the start-time check of a whole run: the config's own field checks
(`config.field_errors`) plus the layout rules below, all reported in one `ConfigError` that names the fields. It
returns the `ParallelLayout` that `init_parallel` builds megatron's process groups from and that the model specs,
the CLI (how many processes to launch) and the scaling model (`scaling.memory.Layout` extends it) read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from megatron_r1v3.config import ConfigError, ModelConfig, ParallelConfig, RunConfig, field_errors


@dataclass(frozen=True)
class ParallelLayout:
    """Process grid: tensor x context x pipeline (x virtual pipeline chunks) x data parallel."""

    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    first_stage_layers: Optional[int] = None  # megatron num_layers_in_first_pipeline_stage (lighter ViT stage)

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: Optional[int] = None) -> ParallelLayout:
        """DP = world size / (TP·PP·CP) (rounded down; `degree_errors` reports a remainder), or `parallel.data`
        (1 when unset) without a world size."""
        model_parallel = max(1, p.tensor * p.pipeline * p.context)
        if world_size is None:
            dp = p.data if p.data > 0 else 1
        else:
            dp = max(1, world_size // model_parallel)
        return cls(tp=p.tensor, pp=p.pipeline, vpp=p.virtual_pipeline, cp=p.context, dp=dp,
                   sequence_parallel=p.sequence_parallel, first_stage_layers=p.decoder_layers_in_first_stage)

    @staticmethod
    def processes_needed(p: ParallelConfig) -> int:
        """tensor x pipeline x context x data (data=-1, derived from the world, counts as 1)."""
        return p.tensor * p.pipeline * p.context * (p.data if p.data > 0 else 1)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def chunks(self) -> int:
        """Model chunks per rank (virtual pipeline stages)."""
        return self.vpp or 1

    @property
    def seq_multiple(self) -> int:
        """Every sequence length must be a multiple of this: TP·CP with sequence parallel (each TP rank holds a
        slice of the sequence), 2·CP with context parallel (load-balanced causal chunks)."""
        m = self.tp * self.cp if self.sequence_parallel else 1
        return math.lcm(m, 2 * self.cp) if self.cp > 1 else m

    def decoder_layers(self, num_layers: int) -> list[list[int]]:
        """[pp_rank][vp_stage] -> decoder layers of that chunk (megatron's split; `problems` checks it divides)."""
        if self.first_stage_layers is not None and self.pp > 1:
            rest = (num_layers - self.first_stage_layers) // (self.pp - 1)
            return [[self.first_stage_layers]] + [[rest] for _ in range(self.pp - 1)]
        return [[num_layers // (self.pp * self.chunks)] * self.chunks for _ in range(self.pp)]

    def problems(self, model: ModelConfig, te_available: bool, seq_length: Optional[int] = None,
                 num_microbatches: Optional[int] = None, global_batch: Optional[int] = None,
                 micro_batch: Optional[int] = None) -> list[str]:
        """Every rule this layout breaks for `model` (empty = it can run); messages name the config fields."""
        errors = [f"parallel.{name}={value} must be >= 1"
                  for name, value in (("tensor", self.tp), ("pipeline", self.pp), ("context", self.cp)) if value < 1]
        if errors:
            return errors
        errors += self._tensor_problems(model)
        errors += self._pipeline_problems(model)
        if self.cp > 1 and not te_available:  # megatron's local attention has no context parallelism
            errors.append(f"parallel.context={self.cp} needs Transformer Engine attention, which is not importable"
                          " here")
        if self.vpp and num_microbatches is not None and (num_microbatches < self.pp or num_microbatches % self.pp):
            errors.append(f"parallel.virtual_pipeline={self.vpp}: the interleaved schedule needs the number of"
                          f" microbatches ({num_microbatches}) to be a multiple of parallel.pipeline={self.pp}")
        if seq_length is not None:
            if seq_length % self.seq_multiple:
                errors.append(f"sequence length {seq_length} is not a multiple of {self.seq_multiple}"
                              f" (parallel.sequence_parallel={self.sequence_parallel}, parallel.tensor={self.tp},"
                              f" parallel.context={self.cp})")
            if seq_length > model.language.max_position_embeddings:
                errors.append(f"sequence length {seq_length} > model.language.max_position_embeddings="
                              f"{model.language.max_position_embeddings}")
        if global_batch is not None and micro_batch is not None and global_batch % (micro_batch * self.dp):
            errors.append(f"train.global_batch_size={global_batch} is not divisible by train.micro_batch_size="
                          f"{micro_batch} x data-parallel size {self.dp}")
        return errors

    def _tensor_problems(self, model: ModelConfig) -> list[str]:
        lm, vit, tp, errors = model.language, model.vision, self.tp, []
        if lm.num_kv_heads % tp:
            errors.append(f"parallel.tensor={tp} does not divide model.language.num_kv_heads={lm.num_kv_heads}"
                          " (KV groups)")
        if lm.ffn_hidden_size % tp:
            errors.append(f"parallel.tensor={tp} does not divide model.language.ffn_hidden_size={lm.ffn_hidden_size}")
        if lm.padded_vocab_size % tp:
            errors.append(f"padded vocab {lm.padded_vocab_size} (model.language.vocab_size={lm.vocab_size},"
                          f" make_vocab_size_divisible_by={lm.make_vocab_size_divisible_by}) does not split over"
                          f" parallel.tensor={tp}")
        if vit.padded_heads % tp:
            errors.append(f"parallel.tensor={tp} does not divide the padded ViT heads {vit.padded_heads}"
                          f" (model.vision.num_heads={vit.num_heads}, head_pad_multiple={vit.head_pad_multiple})")
        if vit.ffn_hidden_size % tp:
            errors.append(f"parallel.tensor={tp} does not divide model.vision.ffn_hidden_size={vit.ffn_hidden_size}")
        return errors

    def _pipeline_problems(self, model: ModelConfig) -> list[str]:
        layers = model.language.num_layers
        if self.pp > layers:
            return [f"parallel.pipeline={self.pp} > model.language.num_layers={layers}"]
        errors = []
        if self.vpp is not None and self.pp < 2:
            errors.append(f"parallel.virtual_pipeline={self.vpp} needs parallel.pipeline >= 2")
        rest, stages, first = layers, self.pp, self.first_stage_layers
        if first is not None:
            if self.pp < 2 or not 0 < first < layers:
                return errors + [f"parallel.decoder_layers_in_first_stage={first} needs parallel.pipeline >= 2 and"
                                 f" 0 < value < model.language.num_layers={layers}"]
            if self.vpp:
                errors.append("parallel.decoder_layers_in_first_stage cannot be combined with"
                              " parallel.virtual_pipeline")
            rest, stages = layers - first, stages - 1
        if rest % (stages * self.chunks):
            errors.append(
                f"model.language.num_layers={layers} does not split evenly over parallel.pipeline={self.pp}"
                + (f" x parallel.virtual_pipeline={self.vpp}" if self.vpp else "")
                + (f" with decoder_layers_in_first_stage={first}" if first is not None else ""))
        return errors

    def build_groups(self) -> None:
        """(Re)build megatron-core's TP/PP/VPP/CP/DP process groups inside the existing torch.distributed world."""
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            virtual_pipeline_model_parallel_size=self.vpp,
            context_parallel_size=self.cp,
        )

    def label(self) -> str:
        """`TP8·PP2·VPP2·DP2` (CP shown when > 1)."""
        return (f"TP{self.tp}·PP{self.pp}" + (f"·VPP{self.vpp}" if self.vpp else "")
                + (f"·CP{self.cp}" if self.cp > 1 else "") + f"·DP{self.dp}")


def degree_errors(p: ParallelConfig, world_size: int) -> list[str]:
    """The degrees against the world size: each >= 1, TP·PP·CP divides the world, `parallel.data` agrees."""
    errors = [f"parallel.{name}={getattr(p, name)} must be >= 1"
              for name in ("tensor", "pipeline", "context") if getattr(p, name) < 1]
    if errors:
        return errors
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        return [f"world size {world_size} is not divisible by parallel.tensor*parallel.pipeline*parallel.context"
                f" = {p.tensor}*{p.pipeline}*{p.context} = {model_parallel}"]
    dp = world_size // model_parallel
    if p.data not in (-1, dp):
        return [f"parallel.data={p.data} but world size {world_size} / (tensor*pipeline*context) = {dp}"]
    return []


def runtime_errors(cfg: RunConfig, te_available: bool) -> list[str]:
    """What this machine's libraries cannot run: FP8 and the TE layer implementation need Transformer Engine."""
    prec, errors = cfg.precision, []
    if prec.fp8 is not None and (not te_available or prec.transformer_impl == "local"):
        errors.append(
            f"precision.fp8={prec.fp8!r} needs Transformer Engine layers, but "
            + ("precision.transformer_impl='local'" if te_available else "transformer_engine is not importable")
            + " (install the `gpu` extra on a CUDA machine, or set precision.fp8=null)")
    if prec.transformer_impl == "transformer_engine" and not te_available:
        errors.append("precision.transformer_impl='transformer_engine' but transformer_engine is not importable")
    return errors


def plan_layout(cfg: RunConfig, world_size: int, te_available: bool = False) -> ParallelLayout:
    """Check that `cfg` can start on `world_size` processes here; returns its layout. Does not modify `cfg`.
    Raises one ConfigError listing every problem (config fields, layout rules, missing libraries)."""
    errors = field_errors(cfg) + runtime_errors(cfg, te_available)
    degrees = degree_errors(cfg.parallel, world_size)
    layout = ParallelLayout.from_config(cfg.parallel, world_size)
    t = cfg.train
    batch = {} if degrees else dict(  # the batch rules need the data-parallel size
        num_microbatches=t.global_batch_size // max(1, t.micro_batch_size * layout.dp),
        global_batch=t.global_batch_size, micro_batch=t.micro_batch_size)
    errors += degrees + layout.problems(cfg.model, te_available, seq_length=cfg.data.seq_length, **batch)
    if errors:
        raise ConfigError("invalid configuration: " + "; ".join(dict.fromkeys(errors)))
    return layout
