"""Residual 3D convolution blocks shared by the volume models."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
        residual = hidden_states if self.conv_shortcut is None else self.conv_shortcut(hidden_states)
        hidden_states = self.conv1(F.silu(self.norm1(hidden_states)))
        hidden_states = self.conv2(F.silu(self.norm2(hidden_states)))
        return residual + hidden_states


# Above this many voxels per sample the channels-last GroupNorm, even centred, loses accuracy (72 channels in groups
# of 3, max error 6.7e-6 at 32³ but 6.4e-5 at 64³, against 1e-6 for NCDHW), so larger maps stay NCDHW.
CHANNELS_LAST_MAX_VOXELS = 32**3


def inference_conv3d(conv: nn.Conv3d, hidden_states: torch.Tensor) -> torch.Tensor:
    """`conv(hidden_states)`, run the fastest exact way PyTorch offers for float32 CPU inference.

    From 5³ up to 32³ voxels the convolution goes to oneDNN in the channels-last (`NDHWC`) layout, which it computes
    without reordering its input and output: a third faster than on `NCDHW` tensors for BiFlowNet's 72 channels at
    32³. The output stays channels-last and so do the layers that follow (GroupNorm through [`owned_group_norm`]).
    Larger maps go to oneDNN in `NCDHW` (`CHANNELS_LAST_MAX_VOXELS` says why); for a batch of one that is still
    about four times as fast as the generic `slow_conv3d` path PyTorch picks when `channels · depth · height` is at
    most 20480. At 4³ voxels and below the generic path is the faster one (576 channels at 4³: 32 against 52 ms)
    and is kept. Training, other devices and dtypes, CPU autocast and `torch.compile` tracing use `conv` unchanged;
    the paths agree to float32 rounding (about 1e-6).
    """
    voxels = hidden_states.shape[2:].numel()
    if (
        hidden_states.device.type == "cpu"
        and hidden_states.dtype == torch.float32
        and voxels > 64
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and not (torch.is_grad_enabled() and (hidden_states.requires_grad or conv.weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
    ):
        # The input's layout selects the weight's and the output's.
        layout = torch.channels_last_3d if voxels <= CHANNELS_LAST_MAX_VOXELS else torch.contiguous_format
        return torch.ops.aten.mkldnn_convolution(
            hidden_states.contiguous(memory_format=layout),
            conv.weight,
            conv.bias,
            list(conv.padding),
            list(conv.stride),
            list(conv.dilation),
            conv.groups,
        )
    return conv(hidden_states)


def owned_group_norm(hidden_states: torch.Tensor, norm: nn.GroupNorm, affine: bool = True) -> torch.Tensor:
    """`norm(hidden_states)` for a tensor the caller no longer needs, exact for channels-last inputs too.

    PyTorch's channels-last CPU GroupNorm accumulates `E[x²] - E[x]²` in float32, which loses the variance when a
    group's mean is large against its spread (72 channels at 32³, mean 10, std 0.5: max error 3.6e-3, against
    2.9e-6 for the `NCDHW` kernel). GroupNorm does not change when a constant is subtracted from a group, so a
    channels-last CPU input (that does not require grad) first has each group's mean, estimated from a strided
    sample, subtracted in place; the error is then that of the `NCDHW` kernel. Other inputs go straight to
    `F.group_norm`. `affine=False` leaves out the norm's weight and bias (for callers that fold them into a
    modulation).
    """
    if (
        hidden_states.device.type == "cpu"
        and not hidden_states.requires_grad
        and not hidden_states.is_contiguous()
        and hidden_states.is_contiguous(memory_format=torch.channels_last_3d)
    ):
        batch, channels = hidden_states.shape[:2]
        sample = hidden_states[:, :, ::4, ::4, ::4].mean(dim=(2, 3, 4)).view(batch, norm.num_groups, -1)
        hidden_states.sub_(sample.mean(dim=2, keepdim=True).expand_as(sample).reshape(batch, channels, 1, 1, 1))
    weight, bias = (norm.weight, norm.bias) if affine else (None, None)
    return F.group_norm(hidden_states, norm.num_groups, weight, bias, norm.eps)


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
            hidden = owned_group_norm(hidden, self.norm1)
        else:
            # GroupNorm affine then FiLM, (x̂·w + b)·(1 + scale) + shift, as one per-(sample, channel) scale/shift.
            scale, shift = self.time_emb_proj(F.silu(condition)).chunk(2, dim=1)
            scale = scale + 1
            weight = self.norm1.weight * scale
            bias = self.norm1.bias * scale + shift
            hidden = owned_group_norm(hidden, self.norm1, affine=False)
            hidden = torch.addcmul(bias[:, :, None, None, None], hidden, weight[:, :, None, None, None])
        hidden = inference_conv3d(self.conv2, F.silu(hidden))
        hidden = owned_group_norm(hidden, self.norm2)
        residual = hidden_states if self.conv_shortcut is None else inference_conv3d(self.conv_shortcut, hidden_states)
        return F.silu(hidden) + residual
