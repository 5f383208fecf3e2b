from .controlnet_3d import ControlNet3DModel, ControlNet3DOutput
