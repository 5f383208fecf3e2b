"""Old import path; BiFlowNet now lives in `meddiffusers.models.unets.biflownet`."""

from ..unets.biflownet import BiFlowNet3DModel, BiFlowNet3DOutput

__all__ = ["BiFlowNet3DModel", "BiFlowNet3DOutput"]
