"""Multi-head self-attention over the voxels of a 3D feature map, with swappable attention processors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.utils import is_xformers_available
from torch import nn


class VolumeAttnProcessor:
    """Default processor: `torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU)."""

    def __call__(self, attn: VolumeAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        # query/key/value: (batch, heads, tokens, head_dim)
        return F.scaled_dot_product_attention(query, key, value)


class VolumeXFormersAttnProcessor:
    """Processor that calls `xformers.ops.memory_efficient_attention` (GPU only, optional dependency)."""

    def __init__(self, attention_op=None):
        self.attention_op = attention_op

    def __call__(self, attn: VolumeAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        import xformers.ops

        # xformers expects (batch, tokens, heads, head_dim)
        out = xformers.ops.memory_efficient_attention(
            query.transpose(1, 2).contiguous(),
            key.transpose(1, 2).contiguous(),
            value.transpose(1, 2).contiguous(),
            op=self.attention_op,
        )
        return out.transpose(1, 2)


class VolumeAttention(nn.Module):
    """Self-attention between all voxels of a `(B, C, D, H, W)` feature map.

    Voxels are flattened in row-major `(D, H, W)` order into tokens; `to_qkv` (a bias-free linear layer) gives
    `heads * head_dim` features each for queries, keys and values, with the head index as the outer factor of those
    features. The merged heads go back to `channels` through a 1x1x1 convolution (`to_out`). Normalisation and the
    residual connection belong to the caller, so the same module serves every model.

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
        self.processor = VolumeAttnProcessor()

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
            self.set_processor(VolumeAttnProcessor())
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
