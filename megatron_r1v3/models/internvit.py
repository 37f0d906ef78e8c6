"""InternViT encoder on megatron-core tensor-parallel linears (spec §1, InternViT-6B-448px-V2.5).

Heads that TP does not divide are zero-padded ("dummy" heads, NVLM recipe): the fused qkv rows, q/k norm weights
and proj columns of a dummy head are zero, so it contributes nothing and receives zero gradient. The q/k RMSNorm
runs over the full (real) hidden width, which under TP needs the sum of squares all-reduced across TP ranks and
divided by the *unpadded* width. Output: last layer with CLS dropped, `[tiles, grid*grid, hidden]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint, sharded_state_dict_default

from megatron_r1v3.config import VisionConfig
from megatron_r1v3.models.norm import RMSNorm


def _all_reduce_tp(x: torch.Tensor) -> torch.Tensor:
    """Sum across TP ranks in forward *and* backward (each rank's output depends on every rank's input)."""
    return tensor_parallel.reduce_from_tensor_model_parallel_region(
        tensor_parallel.copy_to_tensor_model_parallel_region(x)
    )


class TPFullWidthRMSNorm(MegatronModule):
    """RMSNorm over all (real) heads of q or k while each TP rank holds only its heads' slice."""

    def __init__(self, config: TransformerConfig, local_width: int, real_width: int, eps: float):
        super().__init__(config=config)
        self.weight = torch.nn.Parameter(torch.ones(local_width, dtype=config.params_dtype))
        tensor_parallel.set_tensor_model_parallel_attributes(self.weight, True, 0, 1)
        self.real_width, self.eps = real_width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sumsq = x.float().pow(2).sum(-1, keepdim=True)
        if ps.get_tensor_model_parallel_world_size() > 1:
            sumsq = _all_reduce_tp(sumsq)
        y = x.float() * torch.rsqrt(sumsq / self.real_width + self.eps)
        return self.weight * y.to(x.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sd = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(sd, prefix, {"weight": 0}, sharded_offsets)


class InternViTAttention(MegatronModule):
    """Fused qkv (no bias, grouped per head), full-width qk-RMSNorm, SDPA, proj (bias)."""

    def __init__(self, config: TransformerConfig, vcfg: VisionConfig):
        super().__init__(config=config)
        tp = ps.get_tensor_model_parallel_world_size()
        self.head_dim = vcfg.head_dim
        self.local_heads = vcfg.padded_heads // tp
        width = vcfg.padded_heads * self.head_dim
        self.qkv = tensor_parallel.ColumnParallelLinear(
            vcfg.hidden_size, 3 * width, config=config, init_method=config.init_method, bias=False,
            gather_output=False,
        )
        local = self.local_heads * self.head_dim
        self.q_norm = self.k_norm = None
        if vcfg.qk_normalization:
            self.q_norm = TPFullWidthRMSNorm(config, local, vcfg.hidden_size, vcfg.norm_eps)
            self.k_norm = TPFullWidthRMSNorm(config, local, vcfg.hidden_size, vcfg.norm_eps)
        self.proj = tensor_parallel.RowParallelLinear(
            width, vcfg.hidden_size, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, _ = x.shape
        qkv, _ = self.qkv(x)
        q, k, v = qkv.view(n, s, self.local_heads, 3, self.head_dim).unbind(3)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(n, s, -1)).view(n, s, self.local_heads, self.head_dim)
            k = self.k_norm(k.reshape(n, s, -1)).view(n, s, self.local_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out, _ = self.proj(out.transpose(1, 2).reshape(n, s, -1))
        return out


class InternViTMLP(MegatronModule):
    """fc1 (column-parallel) -> exact GELU -> fc2 (row-parallel), both with bias."""

    def __init__(self, config: TransformerConfig, vcfg: VisionConfig):
        super().__init__(config=config)
        self.fc1 = tensor_parallel.ColumnParallelLinear(
            vcfg.hidden_size, vcfg.ffn_hidden_size, config=config, init_method=config.init_method, bias=True,
            gather_output=False,
        )
        self.fc2 = tensor_parallel.RowParallelLinear(
            vcfg.ffn_hidden_size, vcfg.hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.fc1(x)
        out, _ = self.fc2(F.gelu(h))
        return out


class InternViTLayer(MegatronModule):
    """Pre-norm block with layer scale: x += ls1*attn(norm1(x)); x += ls2*mlp(norm2(x))."""

    def __init__(self, config: TransformerConfig, vcfg: VisionConfig):
        super().__init__(config=config)
        self.norm1 = RMSNorm(vcfg.hidden_size, vcfg.norm_eps)
        self.attn = InternViTAttention(config, vcfg)
        self.ls1 = torch.nn.Parameter(torch.full((vcfg.hidden_size,), vcfg.layer_scale_init))
        self.norm2 = RMSNorm(vcfg.hidden_size, vcfg.norm_eps)
        self.mlp = InternViTMLP(config, vcfg)
        self.ls2 = torch.nn.Parameter(torch.full((vcfg.hidden_size,), vcfg.layer_scale_init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.mlp(self.norm2(x))


class InternViTEmbeddings(torch.nn.Module):
    """Conv patch embedding + learned CLS + learned positions (bicubic-interpolated when the grid differs)."""

    def __init__(self, vcfg: VisionConfig):
        super().__init__()
        h = vcfg.hidden_size
        self.grid = vcfg.grid
        self.class_embedding = torch.nn.Parameter(torch.randn(1, 1, h) * 0.02)
        self.patch_embedding = torch.nn.Conv2d(3, h, kernel_size=vcfg.patch_size, stride=vcfg.patch_size)
        self.position_embedding = torch.nn.Parameter(torch.randn(1, 1 + self.grid * self.grid, h) * 0.02)

    def _patch_positions(self, gh: int, gw: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (gh, gw) == (self.grid, self.grid):
            return pos
        grid = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, gh * gw).permute(0, 2, 1).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        n, _, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(patches.dtype)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(gh, gw)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)


class InternViT(MegatronModule):
    """The encoder: embeddings -> N layers -> drop CLS. Lives on the first pipeline stage."""

    def __init__(self, config: TransformerConfig, vcfg: VisionConfig):
        super().__init__(config=config)
        self.vcfg = vcfg
        self.embeddings = InternViTEmbeddings(vcfg)
        self.encoder = torch.nn.Module()
        self.encoder.layers = torch.nn.ModuleList(InternViTLayer(config, vcfg) for _ in range(vcfg.num_layers))
        self.recompute = config.recompute_granularity == "full"
        zero_dummy_heads(self)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            if self.recompute and torch.is_grad_enabled():
                x = tensor_parallel.checkpoint(layer, False, x)
            else:
                x = layer(x)
        return x[:, 1:]

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Per-layer sharded tensors (megatron's default would treat the nested TP linears as replicated)."""
        sd = sharded_state_dict_default(
            self.embeddings, f"{prefix}embeddings.", sharded_offsets, metadata,
            tp_group=ps.get_tensor_model_parallel_group(),  # without it megatron drops the TP rank from replica_id
        )
        for i, layer in enumerate(self.encoder.layers):
            sd.update(layer.sharded_state_dict(f"{prefix}encoder.layers.{i}.", sharded_offsets, metadata))
        return sd


def dummy_head_mask(vcfg: VisionConfig) -> torch.Tensor:
    """Bool [local_heads]: which of this TP rank's heads are padding."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    local = vcfg.padded_heads // tp
    return torch.arange(rank * local, (rank + 1) * local, device="cpu") >= vcfg.num_heads


@torch.no_grad()
def zero_dummy_heads(vit: InternViT) -> None:
    """Zero every weight that belongs to a padding head so it is inert (and stays inert: its grads are zero)."""
    vcfg = vit.vcfg
    dummy = dummy_head_mask(vcfg)
    if not bool(dummy.any()) or vit.embeddings.class_embedding.is_meta:  # meta build: nothing to zero
        return
    d = vcfg.head_dim
    device = vit.embeddings.class_embedding.device
    dummy = dummy.to(device)
    rows = dummy.repeat_interleave(d)  # [local_heads*d]
    for layer in vit.encoder.layers:
        attn = layer.attn
        attn.qkv.weight.view(attn.local_heads, 3, d, -1)[dummy] = 0
        attn.proj.weight[:, rows] = 0
        for norm in (attn.q_norm, attn.k_norm):
            if norm is not None:
                norm.weight[rows] = 0



def padding_parameter_count(vcfg: VisionConfig) -> int:
    """Parameters held by zero dummy heads across the whole encoder (all TP ranks together)."""
    extra = (vcfg.padded_heads - vcfg.num_heads) * vcfg.head_dim
    per_layer = extra * vcfg.hidden_size * 4 + (2 * extra if vcfg.qk_normalization else 0)  # qkv (3x) + proj
    return per_layer * vcfg.num_layers

