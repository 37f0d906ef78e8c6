"""The R1V3 vision-language model: InternViT + connector on the first pipeline stage, Qwen2.5 GPTModel throughout.

Image features replace the decoder's input embeddings 1:1 at `<IMG_CONTEXT>` token positions (the HF and vLLM
convention), so token ids, positions and logprobs line up with vLLM rollouts. Logits of the vocab-padding rows are
set to -inf so softmax, loss and entropy equal the unpadded HF model's.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_r1v3.config import ModelConfig
from megatron_r1v3.models.connector import Connector
from megatron_r1v3.models.internvit import InternViT


class ImageTokenMismatch(ValueError):
    """The number of `<IMG_CONTEXT>` ids differs from the number of image features."""


def splice_image_embeddings(
    embeddings: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """Replace `[s, b, h]` embeddings at image-token positions of `input_ids [b, s]` by `image_embeds [n, h]`.

    Features are consumed sample by sample, position by position (the order tiles were encoded in).
    """
    mask = input_ids == image_token_id
    per_sample = mask.sum(dim=1)
    if int(per_sample.sum()) != image_embeds.shape[0]:
        raise ImageTokenMismatch(
            f"{int(per_sample.sum())} <IMG_CONTEXT> tokens (id {image_token_id}; per sample {per_sample.tolist()})"
            f" but {image_embeds.shape[0]} image features"
        )
    by_batch = embeddings.transpose(0, 1)
    spliced = by_batch.masked_scatter(mask.unsqueeze(-1), image_embeds.to(by_batch.dtype))
    return spliced.transpose(0, 1).contiguous()


class R1V3Model(MegatronModule):
    """One pipeline (or virtual-pipeline) chunk of the VLM. `forward` returns logits `[b, s, V_pad/tp]` on the
    last stage, hidden states `[s, b, h]` elsewhere."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        lm_config: TransformerConfig,
        vit_config: TransformerConfig,
        conn_config: TransformerConfig,
        decoder_spec,
        padded_vocab: int,
        pre_process: bool,
        post_process: bool,
        vp_stage: Optional[int],
        use_te: bool,
    ):
        super().__init__(config=lm_config)
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's pipeline schedules
        self.model_cfg, self.pre_process, self.post_process = model_cfg, pre_process, post_process
        self.padded_vocab = padded_vocab
        lm = model_cfg.language
        self.language_model = GPTModel(
            config=lm_config,
            transformer_layer_spec=decoder_spec,  # a layer spec (TE) or block submodules (local)
            vocab_size=padded_vocab,
            max_sequence_length=lm.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=lm.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(lm.rope_theta),
            scatter_embedding_sequence_parallel=False,  # splice first, then scatter (below)
            vp_stage=vp_stage,
        )
        self.vision_model: Optional[InternViT] = None
        self.mlp1: Optional[Connector] = None
        self.encoded_tiles = 0  # tiles through the ViT since construction (group sharing is measured by it)
        if pre_process:
            v = model_cfg.vision
            self.vision_model = InternViT(vit_config, v)
            self.mlp1 = Connector(
                conn_config, v.hidden_size, lm.hidden_size, model_cfg.connector.downsample_ratio, use_te
            )
            dtype = lm_config.params_dtype
            self.vision_model.to(dtype)
            if self.mlp1.layer_norm is not None:
                self.mlp1.layer_norm.to(dtype)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's finalize_model_grads (embedding-group all-reduce across pipeline stages)."""
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand activations from the previous stage to the decoder."""
        self.language_model.set_input_tensor(input_tensor)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles `[n, 3, S, S]` -> decoder embeddings `[n * tokens_per_tile, h]`; counts the tiles it encodes."""
        self.encoded_tiles += pixel_values.shape[0]
        feats = self.mlp1(self.vision_model(pixel_values))
        return feats.reshape(-1, feats.shape[-1])

    def image_embeddings(self, pixel_values: torch.Tensor, set_of_row: Optional[torch.Tensor],
                         set_tiles: Optional[torch.Tensor]) -> torch.Tensor:
        """Embeddings of every row's images in row order. Group-shared (`set_of_row [b]`, -1 = no image; `set_tiles`
        tiles per set): each image set is encoded once and repeated for each of its rows, so autograd sums the
        rows' gradients into one ViT backward (`rl/batch.py`)."""
        embeds = self.encode_images(pixel_values)
        if set_of_row is None:
            return embeds
        per_set = torch.split(embeds, (set_tiles * self.model_cfg.tokens_per_tile).tolist())
        rows = [per_set[k] for k in set_of_row.tolist() if k >= 0]
        return torch.cat(rows) if rows else embeds[:0]

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        packed_seq_params=None,
        image_set_of_row: Optional[torch.Tensor] = None,
        image_set_tiles: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Logits `[b, s, V_pad/tp]` (last stage) or hidden states. With THD `packed_seq_params` the `[b, s]` batch
        runs as one row of b*s tokens (`models/packing.py`; hidden states `[b*s, 1, h]`); logits keep `[b, s, ...]`."""
        shape = input_ids.shape
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            input_ids = input_ids.reshape(1, -1)  # row-major: image tokens keep the order the tiles come in
            position_ids = None if position_ids is None else position_ids.reshape(1, -1)
        decoder_input = None
        if self.pre_process:
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            if pixel_values is not None and pixel_values.numel():
                image_embeds = self.image_embeddings(pixel_values, image_set_of_row, image_set_tiles)
                decoder_input = splice_image_embeddings(
                    decoder_input, input_ids, image_embeds, self.model_cfg.image_context_token_id
                )
            elif bool((input_ids == self.model_cfg.image_context_token_id).any()):
                raise ImageTokenMismatch("batch has <IMG_CONTEXT> tokens but no pixel_values")
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input)
        out = self.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        if self.post_process:
            out = mask_vocab_padding(out, self.model_cfg.language.vocab_size).reshape(*shape, -1)
        return out


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set logits of padded vocab rows (global index >= vocab_size) of this TP shard to -inf."""
    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    if start + local <= vocab_size:
        return logits
    keep = (torch.arange(start, start + local, device=logits.device) < vocab_size).to(logits.dtype)
    return logits + torch.log(keep)  # log(1)=0, log(0)=-inf; keeps autograd simple


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocab logits `[b, s, V]` from TP-sharded ones (for evaluation and tests, not the training loss)."""
    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return full[..., :vocab_size]
