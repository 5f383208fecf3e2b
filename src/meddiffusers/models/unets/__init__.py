from .biflownet import BiFlowNet3DModel, BiFlowNet3DOutput
from .unet_gem3d import GEM3DUNetModel, GEM3DUNetOutput
from .unet_patch_3d import PatchUNet3DModel, PatchUNet3DOutput
