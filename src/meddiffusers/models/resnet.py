"""Residual 3D convolution blocks shared by the volume models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_inference import inference_conv3d, inference_group_norm


class ResnetBlock3D(nn.Module):
    """Pre-activation residual block: `GroupNorm -> SiLU -> Conv3d(3) -> GroupNorm -> SiLU -> Conv3d(3)` plus a skip.

    The skip is the identity when the width does not change, otherwise a 1x1x1 convolution (`conv_shortcut`).

    Args:
        in_channels: Input channels.
        out_channels: Output channels (defaults to `in_channels`).
        norm_num_groups: Groups of both GroupNorms.
        norm_eps: Epsilon of both GroupNorms.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, norm_num_groups: int = 24, norm_eps=1e-6):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = nn.GroupNorm(norm_num_groups, in_channels, eps=norm_eps)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(norm_num_groups, out_channels, eps=norm_eps)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = (
            nn.Conv3d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shortcut = self.conv_shortcut
        residual = hidden_states if shortcut is None else inference_conv3d(shortcut, hidden_states)
        hidden_states = inference_conv3d(self.conv1, F.silu(inference_group_norm(hidden_states, self.norm1)))
        hidden_states = inference_conv3d(self.conv2, F.silu(inference_group_norm(hidden_states, self.norm2)))
        return residual + hidden_states


class ConditionedResnetBlock3D(nn.Module):
    """Residual block whose first normalisation is modulated (FiLM, scale then shift) by a conditioning vector.

    `conv1 -> GroupNorm -> x·(1 + scale) + shift -> SiLU -> conv2 -> GroupNorm -> SiLU`, plus the input (through a
    1x1x1 `conv_shortcut` when the width changes). `scale` and `shift` come from `time_emb_proj(SiLU(condition))`.

    The forward folds the GroupNorm affine and the FiLM modulation into one per-sample scale and shift (a single
    pass over the feature map) and sends batch-1 CPU inference convolutions to oneDNN ([`inference_conv3d`]); the
    result equals the step-by-step computation to float32 rounding.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        cond_dim: Width of the conditioning vector; `None` (or 0) for an unconditioned block.
        norm_num_groups: Groups of both GroupNorms.
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
        hidden = inference_conv3d(self.conv1, hidden_states)
        if self.time_emb_proj is None:
            hidden = inference_group_norm(hidden, self.norm1, inplace=True)
        else:
            # GroupNorm affine then FiLM, (x̂·w + b)·(1 + scale) + shift, as one per-(sample, channel) scale/shift.
            scale, shift = self.time_emb_proj(F.silu(condition)).chunk(2, dim=1)
            scale = scale + 1
            weight, bias = self.norm1.weight * scale, self.norm1.bias * scale + shift
            hidden = inference_group_norm(hidden, self.norm1, weight, bias, inplace=True)
        # Without autograd the intermediates are rewritten in place (no fresh volume-sized buffers).
        inplace = not hidden.requires_grad
        hidden = inference_conv3d(self.conv2, F.silu(hidden, inplace=inplace))
        hidden = inference_group_norm(hidden, self.norm2, inplace=True)
        residual = hidden_states if self.conv_shortcut is None else inference_conv3d(self.conv_shortcut, hidden_states)
        if inplace:
            return F.silu(hidden, inplace=True).add_(residual)
        return F.silu(hidden) + residual
