"""The U-Net level of BiFlowNet's inter-patch flow."""

from __future__ import annotations

from torch import nn

from ...attention import ResidualVolumeAttention
from ...normalization import ChannelLayerNorm
from ...resnet import ConditionedResnetBlock3D


class UNetLevel3D(nn.Module):
    """Two conditioned resnet blocks, each optionally followed by attention, then an optional resampler.

    The attention is `x + attention(ChannelLayerNorm(x))` ([`ResidualVolumeAttention`]); levels without attention hold
    `nn.Identity` in its place, so weight names keep their positions.

    Args:
        channels: `((in_1, out_1), (in_2, out_2))`, the widths of the two resnet blocks.
        cond_dim: Width of the conditioning vector.
        norm_num_groups: GroupNorm groups of the resnet blocks.
        use_attention: Whether the level has attention.
        heads: Attention heads.
        head_dim: Features per attention head.
        resampler: Module run after the blocks (a down- or up-sampling convolution), or `None`.
    """

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
                ResidualVolumeAttention(out, heads, head_dim, norm=ChannelLayerNorm(out))
                if use_attention
                else nn.Identity()
                for out in (out_1, out_2)
            ]
        )
        self.resampler = resampler
