"""Old import path; the ControlNet now lives in `meddiffusers.models.controlnets.controlnet_3d`."""

from .controlnets.controlnet_3d import ControlNet3DModel, ControlNet3DOutput, zero_conv

__all__ = ["ControlNet3DModel", "ControlNet3DOutput", "zero_conv"]
