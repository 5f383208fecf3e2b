"""meddiffusers: diffusion models for 3D medical imaging in Hugging Face diffusers conventions."""

__version__ = "0.1.0.dev0"

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin
from diffusers.configuration_utils import ConfigMixin

from ._registration import register_with_diffusers
from .evaluation import (
    IntensityConvention,
    MedicalNetFeatureExtractor,
    Planes25DFeatureExtractor,
    RandomFeatureExtractor,
    frechet_distance,
    kernel_inception_distance,
    maximum_mean_discrepancy,
    ms_ssim_3d,
    psnr,
    ssim_3d,
)
from .io import (
    HUWindow,
    NiftiVolume,
    PercentileScaling,
    Region,
    RegionRegistry,
    load_nifti,
    meddiff_fm_regions,
    meddiffusion_regions,
    save_nifti,
)
from .loaders import FromOriginalCheckpointMixin, KeyReport, load_original_checkpoint, load_original_model
from .loaders.original_gem3d_checkpoint import load_gem3d_components
from .models import (
    BiFlowNet3DModel,
    BiFlowNet3DOutput,
    ControlNet3DModel,
    ControlNet3DOutput,
    PatchControlNet3DModel,
    PatchControlNet3DOutput,
    PatchUNet3DModel,
    PatchUNet3DOutput,
    ResidualVolumeAttention,
    SpatialTransformer3D,
    VectorQuantizer3D,
    VectorQuantizer3DOutput,
    VolumeAttention,
    VolumeAttnProcessor,
    VolumeXFormersAttnProcessor,
    VQModel3D,
    VQModel3DEncoderOutput,
)
from .models.autoencoders import load_vq_model
from .models.embeddings import slice_position_embedding
from .models.unets.unet_gem3d import GEM3DUNetModel, GEM3DUNetOutput
from .operators import (
    AveragePoolOperator,
    IdentityOperator,
    LinearOperator,
    MaskOperator,
    RayTransform,
    UndersampledMRI,
)
from .pipelines import (
    AnomalyDetectionOutput,
    DiffPIRPipeline,
    IntensityMap,
    MedDiffusionControlNetPipeline,
    MedDiffusionPipeline,
    MedDiffusionPipelineOutput,
    PatchSlidingWindowPipeline,
    RePaint3DPipeline,
    VolumePipeline,
    VolumePipelineOutput,
)
from .pipelines.gem3d import GEM3DVolumePipeline, GEM3DVolumePipelineOutput, gem3d_ddim_scheduler
from .schedulers import (
    MedDiffusionDDIMScheduler,
    RePaintDDPMScheduler,
    meddiffusion_cosine_betas,
    repaint_jump_schedule,
    scheduler_from_name,
)
from .utils import sliding_window_inference, window_coordinates

register_with_diffusers()

__all__ = [
    "AnomalyDetectionOutput",
    "AveragePoolOperator",
    "BiFlowNet3DModel",
    "BiFlowNet3DOutput",
    "ConfigMixin",
    "ControlNet3DModel",
    "ControlNet3DOutput",
    "DiffPIRPipeline",
    "DiffusionPipeline",
    "FromOriginalCheckpointMixin",
    "HUWindow",
    "IdentityOperator",
    "IntensityMap",
    "KeyReport",
    "LinearOperator",
    "MaskOperator",
    "MedDiffusionControlNetPipeline",
    "MedDiffusionDDIMScheduler",
    "MedDiffusionPipeline",
    "MedDiffusionPipelineOutput",
    "ModelMixin",
    "NiftiVolume",
    "PatchControlNet3DModel",
    "PatchControlNet3DOutput",
    "PatchSlidingWindowPipeline",
    "PatchUNet3DModel",
    "PatchUNet3DOutput",
    "PercentileScaling",
    "RayTransform",
    "RePaint3DPipeline",
    "RePaintDDPMScheduler",
    "Region",
    "RegionRegistry",
    "ResidualVolumeAttention",
    "SchedulerMixin",
    "SpatialTransformer3D",
    "UndersampledMRI",
    "VQModel3D",
    "VolumePipeline",
    "VolumePipelineOutput",
    "VQModel3DEncoderOutput",
    "VectorQuantizer3D",
    "VectorQuantizer3DOutput",
    "VolumeAttention",
    "VolumeAttnProcessor",
    "VolumeXFormersAttnProcessor",
    "load_nifti",
    "load_original_checkpoint",
    "load_vq_model",
    "sliding_window_inference",
    "window_coordinates",
    "load_original_model",
    "meddiffusion_cosine_betas",
    "meddiff_fm_regions",
    "meddiffusion_regions",
    "repaint_jump_schedule",
    "save_nifti",
    "scheduler_from_name",
    "GEM3DVolumePipeline",
    "GEM3DVolumePipelineOutput",
    "gem3d_ddim_scheduler",
    "GEM3DUNetModel",
    "GEM3DUNetOutput",
    "slice_position_embedding",
    "load_gem3d_components",
    "IntensityConvention",
    "MedicalNetFeatureExtractor",
    "Planes25DFeatureExtractor",
    "RandomFeatureExtractor",
    "frechet_distance",
    "kernel_inception_distance",
    "maximum_mean_discrepancy",
    "ms_ssim_3d",
    "psnr",
    "ssim_3d",
]
