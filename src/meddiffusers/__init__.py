"""meddiffusers: diffusion models for 3D medical imaging in Hugging Face diffusers conventions."""

__version__ = "0.1.0.dev0"

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin

from ._registration import register_with_diffusers
from .io import (
    HUWindow,
    NiftiVolume,
    PercentileScaling,
    load_nifti,
    save_nifti,
)
from .loaders import load_original_checkpoint
from .models import (
    VectorQuantizer3D,
    VectorQuantizer3DOutput,
    VolumeAttention,
    VolumeAttnProcessor,
    VolumeXFormersAttnProcessor,
    VQModel3D,
    VQModel3DEncoderOutput,
)

register_with_diffusers()

__all__ = [
    "ConfigMixin",
    "DiffusionPipeline",
    "HUWindow",
    "ModelMixin",
    "NiftiVolume",
    "PercentileScaling",
    "SchedulerMixin",
    "VQModel3D",
    "VQModel3DEncoderOutput",
    "VectorQuantizer3D",
    "VectorQuantizer3DOutput",
    "VolumeAttention",
    "VolumeAttnProcessor",
    "VolumeXFormersAttnProcessor",
    "load_nifti",
    "load_original_checkpoint",
    "save_nifti",
]
