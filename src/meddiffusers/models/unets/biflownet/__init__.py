from .unet_biflownet_3d import BiFlowNet3DModel, BiFlowNet3DOutput
