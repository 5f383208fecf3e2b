"""3D U-Net blocks of BiFlowNet's inter-patch flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention_3d import VolumeAttention


class ConditionedResnetBlock3D(nn.Module):
    """Residual block whose first normalisation is modulated (FiLM, scale then shift) by the conditioning vector.

    `conv1 -> GroupNorm -> x·(1 + scale) + shift -> SiLU -> conv2 -> GroupNorm -> SiLU`, plus the input (through a
    1x1x1 `conv_shortcut` when the width changes). Without `cond_dim` the block is unconditioned.
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int | None, norm_num_groups: int):
        super().__init__()
        self.time_emb_proj = nn.Linear(cond_dim, out_channels * 2) if cond_dim else None
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm1 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv_shortcut = (
            nn.Conv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.norm1(self.conv1(hidden_states))
        if self.time_emb_proj is not None:
            scale, shift = self.time_emb_proj(F.silu(condition))[:, :, None, None, None].chunk(2, dim=1)
            hidden = hidden * (scale + 1) + shift
        hidden = self.norm2(self.conv2(F.silu(hidden)))
        residual = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        return F.silu(hidden) + residual


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of `(B, C, D, H, W)` (biased variance, learnable scale only)."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1, 1))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        var = torch.var(hidden_states, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(hidden_states, dim=1, keepdim=True)
        return (hidden_states - mean) / (var + self.eps).sqrt() * self.weight


class PreNormVolumeAttention(nn.Module):
    """`x + attention(ChannelLayerNorm(x))` over all voxels."""

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__()
        self.norm = ChannelLayerNorm(channels)
        self.attention = VolumeAttention(channels, heads=heads, head_dim=head_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.attention(self.norm(hidden_states))


class UNetLevel3D(nn.Module):
    """Two conditioned resnet blocks, each optionally followed by attention, then an optional resampler."""

    def __init__(self, channels, cond_dim, norm_num_groups, use_attention, heads, head_dim, resampler=None):
        super().__init__()
        (in_1, out_1), (in_2, out_2) = channels
        self.resnets = nn.ModuleList(
            [
                ConditionedResnetBlock3D(in_1, out_1, cond_dim, norm_num_groups),
                ConditionedResnetBlock3D(in_2, out_2, cond_dim, norm_num_groups),
            ]
        )
        self.attentions = nn.ModuleList(
            [
                PreNormVolumeAttention(out, heads, head_dim) if use_attention else nn.Identity()
                for out in (out_1, out_2)
            ]
        )
        self.resampler = resampler
