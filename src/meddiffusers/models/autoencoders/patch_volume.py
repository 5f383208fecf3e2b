"""Encoder and decoder of the Patch-Volume autoencoder (3D MedDiffusion, Wang et al., IEEE TMI 2025)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import ResidualVolumeAttention
from ..cpu_inference import inference_conv3d, inference_group_norm
from ..resnet import ResnetBlock3D
from ..sampling import Downsample3D, Upsample3D


class MidBlock3D(nn.Module):
    """Resnet block, `x + attention(GroupNorm(x))`, resnet block, at constant width."""

    def __init__(self, channels: int, heads: int, head_dim: int, norm_num_groups: int, norm_eps: float):
        super().__init__()
        self.resnet_1 = ResnetBlock3D(channels, channels, norm_num_groups, norm_eps)
        self.attention = ResidualVolumeAttention(
            channels, heads, head_dim, norm=nn.GroupNorm(norm_num_groups, channels, eps=norm_eps)
        )
        self.resnet_2 = ResnetBlock3D(channels, channels, norm_num_groups, norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.resnet_2(self.attention(self.resnet_1(hidden_states)))


class ResampleBlock3D(nn.Module):
    """Two resnet blocks followed by an optional down- or up-sampler (`resampler`)."""

    def __init__(self, in_channels, out_channels, norm_num_groups, norm_eps, resampler: nn.Module | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock3D(in_channels, out_channels, norm_num_groups, norm_eps),
                ResnetBlock3D(out_channels, out_channels, norm_num_groups, norm_eps),
            ]
        )
        self.resampler = resampler

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            hidden_states = resnet(hidden_states)
        return hidden_states if self.resampler is None else self.resampler(hidden_states)


def level_widths(block_out_channels) -> list[int]:
    """Widths of the encoder levels: one per downsampling, then a last full-depth level at the final width."""
    return list(block_out_channels) + [block_out_channels[-1]]


def resample_levels(widths, num_resamplings, resampler_cls, norm_num_groups, norm_eps) -> nn.ModuleList:
    """One [`ResampleBlock3D`] per width; the first `num_resamplings` levels end with `resampler_cls(width)`."""
    levels, previous = nn.ModuleList(), widths[0]
    for level, width in enumerate(widths):
        resampler = resampler_cls(width) if level < num_resamplings else None
        levels.append(ResampleBlock3D(previous, width, norm_num_groups, norm_eps, resampler))
        previous = width
    return levels


def _resnet_inference(block: ResnetBlock3D, inputs: list[torch.Tensor]) -> torch.Tensor:
    """`block(x)` for `x = inputs.pop()`, holding at most three activations (the caller keeps no reference to `x`).

    Same operations and results as `ResnetBlock3D.forward`; the normalisations and activations are applied in place
    and each intermediate is released as soon as the next one exists.
    """
    hidden_states = inputs.pop()
    shortcut = block.conv_shortcut
    residual = hidden_states if shortcut is None else inference_conv3d(shortcut, hidden_states)
    hidden_states = inference_group_norm(hidden_states, block.norm1, inplace=shortcut is not None)
    hidden_states = inference_conv3d(block.conv1, F.silu(hidden_states, inplace=True))
    hidden_states = inference_group_norm(hidden_states, block.norm2, inplace=True)
    hidden_states = inference_conv3d(block.conv2, F.silu(hidden_states, inplace=True))
    return hidden_states.add_(residual)


def _inference_layers(block: nn.Module) -> list[nn.Module]:
    """The layers of a level or middle block, in order, for the lean inference loop of [`_BlockStack`]."""
    if isinstance(block, ResampleBlock3D):
        return [*block.resnets] + ([] if block.resampler is None else [block.resampler])
    if isinstance(block, MidBlock3D):
        return [block.resnet_1, block.attention, block.resnet_2]
    return [block]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


class _BlockStack(nn.Module):
    """`conv_in`, then the subclass's `ordered_blocks()` (each optionally gradient-checkpointed), then norm, SiLU and
    `conv_out`.

    Without autograd the blocks run as one flat loop of layers in which each activation is released as soon as the
    next exists (see `_resnet_inference`), which lowers peak memory without changing any result.
    """

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self._inference_forward(sample)
        hidden_states = inference_conv3d(self.conv_in, sample)
        for block in self.ordered_blocks():
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden_states = self._gradient_checkpointing_func(block, hidden_states)
            else:
                hidden_states = block(hidden_states)
        return inference_conv3d(self.conv_out, F.silu(inference_group_norm(hidden_states, self.norm_out)))

    def _inference_forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.inference_tail(inference_conv3d(self.conv_in, sample), self.ordered_blocks())

    def inference_tail(self, hidden_states: torch.Tensor, blocks: list[nn.Module]) -> torch.Tensor:
        """The lean inference loop over `blocks` (the last of `ordered_blocks`), then the output layers."""
        holder = [hidden_states]
        del hidden_states
        for block in blocks:
            layers = [block] if _has_hooks(block) else _inference_layers(block)
            for layer in layers:
                if isinstance(layer, ResnetBlock3D) and not _has_hooks(layer):
                    holder.append(_resnet_inference(layer, holder))
                else:
                    holder.append(layer(holder.pop()))
        hidden_states = F.silu(inference_group_norm(holder.pop(), self.norm_out, inplace=True), inplace=True)
        return inference_conv3d(self.conv_out, hidden_states).contiguous()


class PatchVolumeEncoder(_BlockStack):
    """Convolutional encoder: `len(block_out_channels)` halvings of every side, a self-attention middle block.

    Args:
        in_channels: Image channels.
        latent_channels: Channels of the (pre-quantisation) latent.
        block_out_channels: Width of each downsampling level; the encoder ends with one more level at the last width.
        norm_num_groups, norm_eps: GroupNorm settings.
        attention_heads, attention_head_dim: Shape of the middle block's attention.
    """

    def __init__(
        self,
        in_channels,
        latent_channels,
        block_out_channels,
        norm_num_groups,
        norm_eps,
        attention_heads,
        attention_head_dim,
    ):
        super().__init__()
        widths = level_widths(block_out_channels)
        self.conv_in = nn.Conv3d(in_channels, widths[0], kernel_size=3, padding=1)
        self.down_blocks = resample_levels(widths, len(block_out_channels), Downsample3D, norm_num_groups, norm_eps)
        self.mid_block = MidBlock3D(widths[-1], attention_heads, attention_head_dim, norm_num_groups, norm_eps)
        self.norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=norm_eps)
        self.conv_out = nn.Conv3d(widths[-1], latent_channels, kernel_size=3, padding=1)

    def ordered_blocks(self) -> list[nn.Module]:
        return [*self.down_blocks, self.mid_block]


class PatchVolumeDecoder(_BlockStack):
    """Mirror of [`PatchVolumeEncoder`]: middle block first, then `len(block_out_channels)` doublings of every side.

    It runs on a whole latent volume at once (the "joint" decoder), so its receptive field crosses the borders of the
    patches the encoder saw independently.
    """

    def __init__(
        self,
        latent_channels,
        out_channels,
        block_out_channels,
        norm_num_groups,
        norm_eps,
        attention_heads,
        attention_head_dim,
    ):
        super().__init__()
        widths = list(reversed(level_widths(block_out_channels)))
        self.conv_in = nn.Conv3d(latent_channels, widths[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock3D(widths[0], attention_heads, attention_head_dim, norm_num_groups, norm_eps)
        self.up_blocks = resample_levels(widths, len(block_out_channels), Upsample3D, norm_num_groups, norm_eps)
        self.norm_out = nn.GroupNorm(norm_num_groups, widths[-1], eps=norm_eps)
        self.conv_out = nn.Conv3d(widths[-1], out_channels, kernel_size=3, padding=1)

    def ordered_blocks(self) -> list[nn.Module]:
        return [self.mid_block, *self.up_blocks]
