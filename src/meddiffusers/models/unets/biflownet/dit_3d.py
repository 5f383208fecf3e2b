"""DiT blocks of BiFlowNet's intra-patch flow: transformers over the tokens of one latent sub-volume."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import TokenAttention

# Inference runs the DiT on groups of sub-volumes of about this many tokens. Each sub-volume is independent, so the
# result is the same; the groups' intermediates (q, k, v, the feed-forward's hidden layer) stay small enough to be
# reused from the allocator and the cache instead of being fresh, page-faulting buffers the size of the whole latent.
INFERENCE_TOKENS_PER_GROUP = 4096


def in_sub_volume_groups(forward, tokens: torch.Tensor, *per_sub_volume: torch.Tensor) -> torch.Tensor:
    """`forward(tokens, *per_sub_volume)`, run on groups of sub-volumes (the batch dimension) when no grad is needed.

    Args:
        forward: A function of `(B, L, dim)` tokens and tensors with the same leading dimension `B`.
        tokens: The tokens of `B` sub-volumes.
        per_sub_volume: Further inputs split with the tokens (conditioning vectors, skip tokens).
    """
    group = max(1, INFERENCE_TOKENS_PER_GROUP // tokens.shape[1])
    if tokens.shape[0] <= group or torch.is_grad_enabled():
        return forward(tokens, *per_sub_volume)
    parts = zip(*(tensor.split(group) for tensor in (tokens, *per_sub_volume)))
    return torch.cat([forward(*part) for part in parts])


def modulate(hidden: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x · (1 + scale) + shift`, broadcast over tokens."""
    return torch.addcmul(shift[:, None], hidden, 1 + scale[:, None])


class FeedForward(nn.Module):
    """`Linear -> GELU(tanh) -> Linear`."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.linear_1 = nn.Linear(dim, hidden)
        self.linear_2 = nn.Linear(hidden, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(tokens), approximate="tanh"))


class AdaLNModulation(nn.Module):
    """`SiLU -> Linear` mapping the conditioning vector to `chunks` modulation vectors."""

    def __init__(self, cond_dim: int, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Linear(cond_dim, dim * chunks)
        self.chunks = chunks

    def forward(self, condition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(condition)).chunk(self.chunks, dim=1)


class DiTBlock3D(nn.Module):
    """Transformer block with adaLN-Zero conditioning and an optional long skip (`skip_proj` of `[x ‖ skip]`).

    Each batch item is one sub-volume; without autograd they run in groups ([`in_sub_volume_groups`]).

    Args:
        dim: Token width.
        heads: Attention heads.
        mlp_ratio: Hidden width of the feed-forward, relative to `dim`.
        cond_dim: Width of the conditioning vector.
        with_skip: Whether the block receives a long skip connection.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cond_dim: int, with_skip: bool = False):
        super().__init__()
        self.skip_proj = nn.Linear(2 * dim, dim) if with_skip else None
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attention = TokenAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, mlp_ratio)
        self.adaln = AdaLNModulation(cond_dim, dim, 6)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor, skip: torch.Tensor | None = None):
        if skip is None:
            return in_sub_volume_groups(self._forward, tokens, condition)
        return in_sub_volume_groups(self._forward, tokens, condition, skip)

    def _forward(self, tokens: torch.Tensor, condition: torch.Tensor, skip: torch.Tensor | None = None):
        if self.skip_proj is not None:
            tokens = self.skip_proj(torch.cat([tokens, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaln(condition)
        attended = self.attention(modulate(self.norm1(tokens), shift_msa, scale_msa))
        tokens = torch.addcmul(tokens, gate_msa[:, None], attended)
        return torch.addcmul(tokens, gate_mlp[:, None], self.ff(modulate(self.norm2(tokens), shift_mlp, scale_mlp)))


class DiTOutputLayer3D(nn.Module):
    """Final adaLN layer: tokens → `patch_size³ · out_dim` values per token (the U-Net feature of that token)."""

    def __init__(self, dim: int, patch_size: int, out_dim: int, cond_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size**3 * out_dim)
        self.adaln = AdaLNModulation(cond_dim, dim, 2)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return in_sub_volume_groups(self._forward, tokens, condition)

    def _forward(self, tokens: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln(condition)
        return self.proj_out(modulate(self.norm(tokens), shift, scale))


class DiTStage(nn.Module):
    """A DiT block followed by its output layer (one fusion level of the intra-patch flow)."""

    def __init__(self, dim, heads, mlp_ratio, cond_dim, patch_size, with_skip=False):
        super().__init__()
        self.block = DiTBlock3D(dim, heads, mlp_ratio, cond_dim, with_skip=with_skip)
        self.output = DiTOutputLayer3D(dim, patch_size, dim, cond_dim)
