"""Multi-head self-attention for 3D models, with diffusers-style swappable attention processors.

Two layers share one processor interface, `processor(attn, query, key, value) -> out` on `(batch, heads, tokens,
head_dim)` tensors: [`VolumeAttention`] (all voxels of a `(B, C, D, H, W)` feature map) and [`TokenAttention`]
(a `(B, L, dim)` token sequence, as in DiT blocks). Both expose `get_processor` / `set_processor` and
`set_use_memory_efficient_attention_xformers`, so diffusers' `model.attn_processors`, `model.set_attn_processor(...)`
and `model.enable_xformers_memory_efficient_attention()` reach every attention layer of a model.
[`SpatialTransformer3D`] wraps diffusers' own transformer block, whose attention uses diffusers' processors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.utils import is_xformers_available
from torch import nn

from .cpu_inference import inference_group_norm


class VolumeAttnProcessor:
    """Default processor: `torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU)."""

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        # query/key/value: (batch, heads, tokens, head_dim)
        return F.scaled_dot_product_attention(query, key, value)


class PaddedHeadAttnProcessor:
    """SDPA with the head dimension zero-padded to a multiple of `multiple` (the default for [`TokenAttention`]).

    PyTorch's CPU flash-attention kernel is much slower for head dimensions that are not a multiple of its vector
    width: BiFlowNet's DiT heads have 72 / 8 = 9 features, and padding them to 16 nearly halves the attention time.
    Zero features add nothing to the query-key products, and the padded value features are dropped, so with the
    scale kept at `head_dim^-0.5` the result is the plain SDPA one to float32 rounding. Head dimensions that are
    already multiples, and tensors on other devices, are passed through unchanged. [`TokenAttention`] applies the
    same padding more cheaply, through zero rows of its `to_qkv` projection, when it holds this processor.

    Args:
        multiple: Pad the head dimension up to a multiple of this.
    """

    def __init__(self, multiple: int = 16):
        self.multiple = multiple

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        head_dim = query.shape[-1]
        pad = -head_dim % self.multiple
        if pad == 0 or query.device.type != "cpu":
            return F.scaled_dot_product_attention(query, key, value)
        query, key, value = (F.pad(t, (0, pad)) for t in (query, key, value))
        return F.scaled_dot_product_attention(query, key, value, scale=head_dim**-0.5)[..., :head_dim]


class VolumeXFormersAttnProcessor:
    """Processor that calls `xformers.ops.memory_efficient_attention` (GPU only, optional dependency)."""

    def __init__(self, attention_op=None):
        self.attention_op = attention_op

    def __call__(self, attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        import xformers.ops

        # xformers expects (batch, tokens, heads, head_dim)
        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2).contiguous(),
            key.transpose(1, 2).contiguous(),
            value.transpose(1, 2).contiguous(),
            op=self.attention_op,
        )
        return out.transpose(1, 2)


class AttentionProcessorMixin:
    """`get_processor`, `set_processor` and the xformers switch of an attention layer holding `self.processor`.

    `default_processor_class` is the processor a layer starts with and returns to when xformers is switched off.
    """

    default_processor_class = VolumeAttnProcessor

    def get_processor(self):
        """Return the attention processor in use."""
        return self.processor

    def set_processor(self, processor) -> None:
        """Use `processor` (a callable `(attn, query, key, value) -> out`) for the attention product."""
        self.processor = processor

    def set_use_memory_efficient_attention_xformers(
        self, use_memory_efficient_attention_xformers: bool, attention_op=None
    ):
        """Switch to xformers' memory-efficient attention; called by `enable_xformers_memory_efficient_attention()`."""
        if not use_memory_efficient_attention_xformers:
            self.set_processor(self.default_processor_class())
            return
        if not is_xformers_available():
            raise ModuleNotFoundError(
                "xformers is not installed. Install it with `pip install meddiffusers[xformers]` (matching your CUDA "
                "build of PyTorch), or keep the default PyTorch SDPA attention."
            )
        if not torch.cuda.is_available():
            raise ValueError(
                "xformers memory-efficient attention needs a CUDA GPU; torch.cuda.is_available() is False."
            )
        self.set_processor(VolumeXFormersAttnProcessor(attention_op))


class VolumeAttention(AttentionProcessorMixin, nn.Module):
    """Self-attention between all voxels of a `(B, C, D, H, W)` feature map.

    Voxels are flattened in row-major `(D, H, W)` order into tokens; `to_qkv` (a bias-free linear layer) gives
    `heads * head_dim` features each for queries, keys and values, with the head index as the outer factor of those
    features. The merged heads go back to `channels` through a 1x1x1 convolution (`to_out`). Normalisation and the
    residual connection belong to the caller (see [`ResidualVolumeAttention`]), so the same module serves every
    model.

    Args:
        channels: Channels of the input and output feature map.
        heads: Number of attention heads.
        head_dim: Features per head.
    """

    def __init__(self, channels: int, heads: int = 4, head_dim: int = 32):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        inner_dim = heads * head_dim
        self.to_qkv = nn.Linear(channels, inner_dim * 3, bias=False)
        self.to_out = nn.Conv3d(inner_dim, channels, kernel_size=1)
        self.processor = self.default_processor_class()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, _, depth, height, width = hidden_states.shape
        tokens = hidden_states.flatten(2).transpose(1, 2)
        query, key, value = self.to_qkv(tokens).chunk(3, dim=-1)
        query, key, value = (
            t.reshape(batch, -1, self.heads, self.head_dim).transpose(1, 2) for t in (query, key, value)
        )
        out = self.processor(self, query, key, value)
        out = out.transpose(1, 2).reshape(batch, depth, height, width, self.heads * self.head_dim)
        return self.to_out(out.permute(0, 4, 1, 2, 3))


class ResidualVolumeAttention(nn.Module):
    """`x + attention(norm(x))`: a [`VolumeAttention`] with a pre-normalisation and a residual connection.

    The children are named `norm` and `attention`, so the weights are `norm.*` and `attention.to_qkv/to_out.*`
    whatever the normalisation is.

    Args:
        channels: Channels of the feature map.
        heads: Number of attention heads.
        head_dim: Features per head.
        norm: The normalisation applied before attention, e.g. `nn.GroupNorm(24, channels)` (the autoencoder) or
            [`ChannelLayerNorm`] (the BiFlowNet U-Net).
    """

    def __init__(self, channels: int, heads: int, head_dim: int, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.attention = VolumeAttention(channels, heads=heads, head_dim=head_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, nn.GroupNorm):
            return hidden_states + self.attention(inference_group_norm(hidden_states, self.norm))
        return hidden_states + self.attention(self.norm(hidden_states))


class TokenAttention(AttentionProcessorMixin, nn.Module):
    """Multi-head self-attention over a `(B, L, dim)` token sequence (`to_qkv` with bias, processor, `to_out`).

    `to_qkv` gives `dim` features each for queries, keys and values (in that order, heads the outer factor within
    each); the default processor is PyTorch SDPA with the head dimension zero-padded to a multiple of 16
    ([`PaddedHeadAttnProcessor`], faster on CPU for DiT heads of 9 features).

    Args:
        dim: Token width (divisible by `heads`).
        heads: Number of attention heads.
    """

    default_processor_class = PaddedHeadAttnProcessor

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"DiT width {dim} is not divisible by its {heads} heads.")
        self.heads = heads
        self.head_dim = dim // heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.to_out = nn.Linear(dim, dim)
        self.processor = self.default_processor_class()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, dim = tokens.shape
        pad = 0
        if isinstance(self.processor, PaddedHeadAttnProcessor) and tokens.device.type == "cpu":
            pad = -self.head_dim % self.processor.multiple
        if pad == 0:
            qkv = self.to_qkv(tokens).reshape(batch, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = self.processor(self, qkv[0], qkv[1], qkv[2])
        else:
            # Zero rows in the projection give the padded heads directly (no padding copies of q, k and v).
            weight = F.pad(self.to_qkv.weight.view(3, self.heads, self.head_dim, dim), (0, 0, 0, pad))
            bias = F.pad(self.to_qkv.bias.view(3, self.heads, self.head_dim), (0, pad))
            qkv = F.linear(tokens, weight.reshape(-1, dim), bias.reshape(-1))
            qkv = qkv.reshape(batch, length, 3, self.heads, self.head_dim + pad).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], scale=self.head_dim**-0.5)
            out = out[..., : self.head_dim]
        return self.to_out(out.transpose(1, 2).reshape(batch, length, dim))


class SpatialTransformer3D(nn.Module):
    """Transformer blocks over the voxels of a 3D feature map (the latent-diffusion "spatial transformer").

    `GroupNorm -> Linear -> diffusers BasicTransformerBlock(s) -> Linear` on the flattened voxels, added to the input.
    Each block has self-attention, optional cross-attention to `encoder_hidden_states` and a GEGLU feed-forward; its
    attention goes through diffusers' attention processors (SDPA by default, xformers where installed), so
    `set_attn_processor` and `enable_xformers_memory_efficient_attention` of the model reach it. The output
    projection starts at zero, so a new transformer starts as the identity.

    Args:
        channels: Channels of the feature map.
        heads: Attention heads.
        head_dim: Features per head.
        num_layers: Transformer blocks.
        cross_attention_dim: Width of the context tokens, or `None` for self-attention only.
        norm_num_groups: Groups of the input GroupNorm.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        num_layers: int = 1,
        cross_attention_dim: int | None = None,
        norm_num_groups: int = 32,
    ):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim=cross_attention_dim)
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        batch, _, depth, height, width = hidden_states.shape
        tokens = self.proj_in(self.norm(hidden_states).flatten(2).transpose(1, 2))
        for block in self.transformer_blocks:
            tokens = block(tokens, encoder_hidden_states=encoder_hidden_states)
        tokens = self.proj_out(tokens)
        return hidden_states + tokens.transpose(1, 2).reshape(batch, -1, depth, height, width)
