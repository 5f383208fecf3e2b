"""Old import path; the blocks now live in `meddiffusers.models.resnet` and `meddiffusers.models.sampling`."""

from .resnet import ResnetBlock3D
from .sampling import Downsample3D, Upsample3D

__all__ = ["Downsample3D", "ResnetBlock3D", "Upsample3D"]
