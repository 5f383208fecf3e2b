"""Normalisation layers for `(B, C, D, H, W)` feature maps that `torch.nn` does not provide."""

from __future__ import annotations

import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of `(B, C, D, H, W)`: each voxel's channels are normalised on their own.

    The variance is the biased one and there is a learnable scale (`weight`, shape `(1, C, 1, 1, 1)`) but no shift,
    as in the 3D MedDiffusion U-Net attention.

    Args:
        channels: Number of channels `C`.
        eps: Added to the variance before the square root.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1, 1))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        var = torch.var(hidden_states, dim=1, unbiased=False, keepdim=True)
        mean = torch.mean(hidden_states, dim=1, keepdim=True)
        return (hidden_states - mean) / (var + self.eps).sqrt() * self.weight
