"""Old import path; the blocks now live in `meddiffusers.models.resnet`, `.normalization`, `.attention` and
`meddiffusers.models.unets.biflownet.unet_blocks`."""

from ..attention import ResidualVolumeAttention
from ..normalization import ChannelLayerNorm
from ..resnet import ConditionedResnetBlock3D
from ..unets.biflownet.unet_blocks import UNetLevel3D


class PreNormVolumeAttention(ResidualVolumeAttention):
    """Former name of `ResidualVolumeAttention(channels, heads, head_dim, norm=ChannelLayerNorm(channels))`."""

    def __init__(self, channels: int, heads: int, head_dim: int):
        super().__init__(channels, heads, head_dim, norm=ChannelLayerNorm(channels))


__all__ = ["ChannelLayerNorm", "ConditionedResnetBlock3D", "PreNormVolumeAttention", "UNetLevel3D"]
