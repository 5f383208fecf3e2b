from .attention import (
    ResidualVolumeAttention,
    SpatialTransformer3D,
    TokenAttention,
    VolumeAttention,
    VolumeAttnProcessor,
    VolumeXFormersAttnProcessor,
)
from .autoencoders import VectorQuantizer3D, VectorQuantizer3DOutput, VQModel3D, VQModel3DEncoderOutput
from .controlnets import ControlNet3DModel, ControlNet3DOutput, PatchControlNet3DModel, PatchControlNet3DOutput
from .embeddings import slice_position_embedding
from .normalization import ChannelLayerNorm
from .resnet import ConditionedResnetBlock3D, ResnetBlock3D
from .sampling import Downsample3D, Upsample3D
from .unets import BiFlowNet3DModel, BiFlowNet3DOutput, PatchUNet3DModel, PatchUNet3DOutput
from .unets.unet_gem3d import GEM3DUNetModel, GEM3DUNetOutput
