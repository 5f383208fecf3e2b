"""Learned 3D down- and up-sampling by a factor of two.

The convolutions are made by `downsampling_conv` / `upsampling_conv`. Models whose weights sit directly on the
convolution (BiFlowNet's `resampler.weight`) use those; models whose weights sit one level deeper
(the autoencoder's `resampler.conv.weight`) use the [`Downsample3D`] / [`Upsample3D`] modules that wrap them.
"""

from __future__ import annotations

import torch
from torch import nn

from .cpu_inference import inference_conv3d, inference_conv_transpose3d


def downsampling_conv(channels: int) -> nn.Conv3d:
    """`Conv3d(channels, channels, kernel 4, stride 2, padding 1)`: halves every even spatial side."""
    return nn.Conv3d(channels, channels, kernel_size=4, stride=2, padding=1)


def upsampling_conv(channels: int) -> nn.ConvTranspose3d:
    """`ConvTranspose3d(channels, channels, kernel 4, stride 2, padding 1)`: doubles every spatial side."""
    return nn.ConvTranspose3d(channels, channels, kernel_size=4, stride=2, padding=1)


class Downsample3D(nn.Module):
    """Halve every spatial side with a [`downsampling_conv`] (weights under `conv`).

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = downsampling_conv(channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return inference_conv3d(self.conv, hidden_states)


class Upsample3D(nn.Module):
    """Double every spatial side with an [`upsampling_conv`] (weights under `conv`).

    Args:
        channels: Input and output channels.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = upsampling_conv(channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return inference_conv_transpose3d(self.conv, hidden_states)
