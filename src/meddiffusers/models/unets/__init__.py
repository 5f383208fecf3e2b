from .biflownet import BiFlowNet3DModel, BiFlowNet3DOutput
