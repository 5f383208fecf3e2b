"""Exact, faster float32 CPU inference for 3D convolutions, transposed convolutions and GroupNorm.

oneDNN computes 3D convolutions on channels-last (`NDHWC`) tensors without reordering them, 1.1 to 2.5 times as fast
as on `NCDHW` ones for the models' maps. The helpers below keep feature maps channels-last from one layer to the next:

* [`inference_conv3d`] and [`inference_conv_transpose3d`] send a convolution to oneDNN in channels-last;
* [`inference_group_norm`] normalises a channels-last map with statistics accumulated in float64. PyTorch's own
  channels-last CPU GroupNorm is not exact: it sums `x` and `x²` in float32 and takes `E[x²] - E[x]²`, which is off
  by up to 1e-2 when a group's mean is large against its spread or the group holds millions of values.

Each helper steps aside, calling the module unchanged, whenever autograd needs the result, under CPU autocast, during
`torch.compile` tracing, and for other devices and dtypes; the two routes agree to float32 rounding (about 1e-6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many voxels per map the generic convolution is the faster one (576 channels at 4³: 32 against 52 ms).
GENERIC_CONV_MAX_VOXELS = 64

# Rows (voxels) per block when accumulating channels-last GroupNorm statistics: small enough to stay in cache.
STATISTICS_BLOCK_ROWS = 4096

_TRANSPOSED_PHASE_TAPS = ((3, 1), (2, 0))  # kernel taps of even / odd output rows, for kernel 4, stride 2, padding 1


def _fast_path(hidden_states: torch.Tensor, *parameters: torch.Tensor | None) -> bool:
    needs_grad = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (hidden_states, *parameters)
    )
    return (
        hidden_states.device.type == "cpu"
        and hidden_states.dtype == torch.float32
        and not needs_grad
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def _onednn_path(conv: nn.Module, hidden_states: torch.Tensor) -> bool:
    return (
        _fast_path(hidden_states, conv.weight, conv.bias)
        and hidden_states.shape[2:].numel() > GENERIC_CONV_MAX_VOXELS
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def _channels_last(hidden_states: torch.Tensor) -> torch.Tensor:
    if hidden_states.shape[1] == 1:
        # One channel is both layouts at once; channels-last strides make oneDNN answer in channels-last too.
        hidden_states = hidden_states.contiguous()
        depth, height, width = hidden_states.shape[2:]
        return hidden_states.as_strided(hidden_states.shape, (depth * height * width, 1, height * width, width, 1))
    return hidden_states.contiguous(memory_format=torch.channels_last_3d)


def _onednn_conv(hidden_states, weight, bias, padding, stride, dilation, groups) -> torch.Tensor:
    return torch.ops.aten.mkldnn_convolution(
        _channels_last(hidden_states),
        weight,
        bias,
        list(padding),
        list(stride),
        list(dilation),
        groups,
    )


def is_channels_last(hidden_states: torch.Tensor) -> bool:
    """Whether a 5D tensor is laid out channels-last (`NDHWC`) and not also plain contiguous."""
    return (
        hidden_states.dim() == 5
        and not hidden_states.is_contiguous()
        and hidden_states.is_contiguous(memory_format=torch.channels_last_3d)
    )


def inference_conv3d(conv: nn.Conv3d, hidden_states: torch.Tensor, padding=None) -> torch.Tensor:
    """`conv(hidden_states)`, through oneDNN in channels-last for float32 CPU inference.

    The output is channels-last; the layers that follow take it as it is (GroupNorm through
    [`inference_group_norm`]). Maps of at most `GENERIC_CONV_MAX_VOXELS` voxels, training, CPU autocast,
    `torch.compile` tracing, other devices and dtypes use `conv` unchanged. `padding` (three ints) replaces the
    convolution's own, for callers that pad some sides themselves.
    """
    if _onednn_path(conv, hidden_states):
        padding = conv.padding if padding is None else padding
        return _onednn_conv(hidden_states, conv.weight, conv.bias, padding, conv.stride, conv.dilation, conv.groups)
    if padding is None:
        return conv(hidden_states)
    return F.conv3d(hidden_states, conv.weight, conv.bias, conv.stride, padding, conv.dilation, conv.groups)


def is_doubling_transpose(conv: nn.Module) -> bool:
    """Whether `conv` is the `ConvTranspose3d(kernel 4, stride 2, padding 1)` that [`inference_conv_transpose3d`]
    computes as one convolution."""
    return (
        isinstance(conv, nn.ConvTranspose3d)
        and tuple(conv.kernel_size) == (4, 4, 4)
        and tuple(conv.stride) == (2, 2, 2)
        and tuple(conv.padding) == (1, 1, 1)
        and tuple(conv.output_padding) == (0, 0, 0)
        and tuple(conv.dilation) == (1, 1, 1)
        and conv.groups == 1
    )


def _phase_weight(weight: torch.Tensor) -> torch.Tensor:
    """The `(8·C_out, C_in, 2, 2, 2)` convolution weight whose output channel blocks are the eight output phases."""
    taps = torch.tensor(_TRANSPOSED_PHASE_TAPS, device=weight.device)
    # (C_in, C_out, 4, 4, 4) -> (C_in, C_out, phase_d, tap_d, phase_h, tap_h, phase_w, tap_w)
    phased = weight[:, :, taps][:, :, :, :, taps][..., taps]
    return phased.permute(2, 4, 6, 1, 0, 3, 5, 7).reshape(-1, weight.shape[0], 2, 2, 2)


def inference_conv_transpose3d(conv: nn.ConvTranspose3d, hidden_states: torch.Tensor) -> torch.Tensor:
    """`conv(hidden_states)` for the doubling `ConvTranspose3d(kernel 4, stride 2, padding 1)`, as one convolution.

    Output row `2m` along an axis takes input rows `m - 1, m` (kernel taps 3, 1) and row `2m + 1` rows `m, m + 1`
    (taps 2, 0). So the eight output phases are one stride-1 `2³` convolution with `8·C_out` channels of the input
    padded by one voxel, interleaved into the output: the same multiply-adds as the transposed convolution, on
    oneDNN's channels-last path (at 96 channels and 64³ input, 2.4 against 5.3 s). The output is channels-last.
    Other configurations and the cases listed in [`inference_conv3d`] use `conv` unchanged.
    """
    if not (is_doubling_transpose(conv) and _onednn_path(conv, hidden_states)):
        return conv(hidden_states)
    batch, _, depth, height, width = hidden_states.shape
    channels = conv.out_channels
    bias = None if conv.bias is None else conv.bias.repeat(8)
    phases = _onednn_conv(hidden_states, _phase_weight(conv.weight), bias, (1, 1, 1), (1, 1, 1), (1, 1, 1), 1)
    phases = phases.permute(0, 2, 3, 4, 1).view(batch, depth + 1, height + 1, width + 1, 2, 2, 2, channels)
    out = torch.empty(
        (batch, channels, 2 * depth, 2 * height, 2 * width),
        dtype=phases.dtype,
        memory_format=torch.channels_last_3d,
    )
    rows = out.permute(0, 2, 3, 4, 1).view(batch, depth, 2, height, 2, width, 2, channels)
    for d in range(2):
        for h in range(2):
            for w in range(2):
                rows[:, :, d, :, h, :, w] = phases[:, d : d + depth, h : h + height, w : w + width, d, h, w]
    return out


def channel_statistics(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, channel) mean and biased variance, `(N, C)` float64, of a `(N, C, D, H, W)` map in any layout.

    A channels-last map is read block by block of `STATISTICS_BLOCK_ROWS` voxels. Each block is shifted by a
    per-channel estimate of the mean (from a strided sample), so its float32 sums of `x - shift` and `(x - shift)²`
    lose nothing to cancellation, and the block sums are accumulated in float64. Other maps use `torch.var_mean`.
    """
    batch, channels = hidden_states.shape[:2]
    if not is_channels_last(hidden_states):
        variance, mean = torch.var_mean(hidden_states.flatten(2), dim=-1, correction=0)
        return mean.double(), variance.double()
    rows = hidden_states.permute(0, 2, 3, 4, 1).reshape(batch, -1, channels)  # a view of the NDHWC storage
    count = rows.shape[1]
    shift = hidden_states[:, :, ::4, ::4, ::4].mean(dim=(2, 3, 4)).view(batch, 1, channels)
    first = torch.zeros(batch, channels, dtype=torch.float64, device=rows.device)
    second = torch.zeros_like(first)
    for start in range(0, count, STATISTICS_BLOCK_ROWS):
        block = rows[:, start : start + STATISTICS_BLOCK_ROWS] - shift
        first += block.sum(dim=1)
        second += block.mul_(block).sum(dim=1)
    first, second = first / count, second / count
    return first + shift.view(batch, channels), (second - first.square()).clamp_(min=0)


def group_statistics(hidden_states: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(sample, group) mean and biased variance, `(N, G)` float64, merged exactly from [`channel_statistics`]."""
    batch, channels = hidden_states.shape[:2]
    mean, variance = (t.view(batch, num_groups, -1) for t in channel_statistics(hidden_states))
    group_mean = mean.mean(dim=2)
    return group_mean, (variance + (mean - group_mean[..., None]).square()).mean(dim=2)


def inference_group_norm(
    hidden_states: torch.Tensor,
    norm: nn.GroupNorm,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """`norm(hidden_states)`, exact for channels-last maps, optionally with a per-sample affine.

    Args:
        hidden_states: `(N, C, D, H, W)` feature map.
        norm: The `nn.GroupNorm` (its groups and epsilon, and its affine unless `weight` / `bias` are given).
        weight, bias: `(N, C)` per-sample affine used instead of the norm's own (e.g. a GroupNorm affine folded with a
            FiLM modulation); both or neither.
        inplace: Write the result into `hidden_states` where that is possible (the caller no longer needs it).

    A channels-last float32 CPU map that needs no grad gets statistics from [`group_statistics`] and
    one fused multiply-add per voxel, and stays channels-last. Other maps go to PyTorch's GroupNorm.
    """
    modulated = weight is not None
    if not (_fast_path(hidden_states, norm.weight, norm.bias, weight, bias) and is_channels_last(hidden_states)):
        if hidden_states.device.type == "cpu" and is_channels_last(hidden_states):
            hidden_states = hidden_states.contiguous()  # where PyTorch's GroupNorm is exact
        if not modulated:
            return norm(hidden_states)
        normed = F.group_norm(hidden_states, norm.num_groups, eps=norm.eps)
        return torch.addcmul(bias[:, :, None, None, None], normed, weight[:, :, None, None, None])
    batch, channels = hidden_states.shape[:2]
    mean, variance = group_statistics(hidden_states, norm.num_groups)
    per_group = channels // norm.num_groups
    scale = (variance + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
    mean = mean.repeat_interleave(per_group, dim=1)
    if not modulated:
        weight = torch.ones(channels) if norm.weight is None else norm.weight
        bias = torch.zeros(channels) if norm.bias is None else norm.bias
    scale = scale * weight.double()
    shift = bias.double() - mean * scale
    shape = (batch, channels, 1, 1, 1)
    shift, scale = shift.float().view(shape), scale.float().view(shape)
    return torch.addcmul(shift, hidden_states, scale, out=hidden_states if inplace else None)
