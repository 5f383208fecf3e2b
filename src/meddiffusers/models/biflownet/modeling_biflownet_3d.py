"""Old import path; the model now lives in `meddiffusers.models.unets.biflownet.unet_biflownet_3d`."""

from ..unets.biflownet.unet_biflownet_3d import BiFlowNet3DModel, BiFlowNet3DOutput

__all__ = ["BiFlowNet3DModel", "BiFlowNet3DOutput"]
