from .attention_3d import VolumeAttention, VolumeAttnProcessor, VolumeXFormersAttnProcessor
from .autoencoders import VectorQuantizer3D, VectorQuantizer3DOutput, VQModel3D, VQModel3DEncoderOutput
from .biflownet import BiFlowNet3DModel, BiFlowNet3DOutput
from .controlnet_3d import ControlNet3DModel, ControlNet3DOutput
