"""Evaluation of generated and restored volumes: feature extractors from local weights and the metrics of the papers.

- features: [`FeatureExtractor`] (`(B, 1, D, H, W)` in `[-1, 1]` → `(B, F)`), [`MedicalNetFeatureExtractor`]
  (3D ResNet-10/18/34/50 with MedicalNet's layer names), [`Planes25DFeatureExtractor`] (MAISI's 2.5D protocol over
  a torchvision 2D backbone) and [`RandomFeatureExtractor`] (seeded, never comparable);
- feature metrics: [`frechet_distance`], [`kernel_inception_distance`], [`maximum_mean_discrepancy`];
- voxel metrics: [`ssim_3d`], [`ms_ssim_3d`], [`psnr`], [`dice`];
- the intensity convention of a result: [`IntensityConvention`];
- the command line: `meddiffusers evaluate` ([`evaluate`]).
"""

from .cli import add_evaluate_arguments, evaluate
from .features import (
    FeatureExtractor,
    RandomFeatureExtractor,
    build_feature_extractor,
    check_sha256,
    file_sha256,
    load_weight_file,
)
from .intensity import IntensityConvention
from .medicalnet import (
    MEDICALNET_DEPTHS,
    MEDICALNET_NORMALIZATIONS,
    MEDICALNET_SHA256,
    MedicalNetFeatureExtractor,
    MedicalNetResNet3D,
    medicalnet_state_dict,
)
from .metrics import (
    dice,
    frechet_distance,
    kernel_inception_distance,
    maximum_mean_discrepancy,
    median_bandwidth,
    psnr,
)
from .planes import MAISI_CHANNEL_MEANS, PLANES, Planes25DFeatureExtractor, maisi_frechet_distance
from .ssim import MS_SSIM_WEIGHTS, ms_ssim_3d, ms_ssim_min_size, ssim_3d

__all__ = [
    "MAISI_CHANNEL_MEANS",
    "MEDICALNET_DEPTHS",
    "MEDICALNET_NORMALIZATIONS",
    "MEDICALNET_SHA256",
    "MS_SSIM_WEIGHTS",
    "PLANES",
    "FeatureExtractor",
    "IntensityConvention",
    "MedicalNetFeatureExtractor",
    "MedicalNetResNet3D",
    "Planes25DFeatureExtractor",
    "RandomFeatureExtractor",
    "add_evaluate_arguments",
    "build_feature_extractor",
    "check_sha256",
    "dice",
    "evaluate",
    "file_sha256",
    "frechet_distance",
    "kernel_inception_distance",
    "load_weight_file",
    "maisi_frechet_distance",
    "maximum_mean_discrepancy",
    "median_bandwidth",
    "medicalnet_state_dict",
    "ms_ssim_3d",
    "ms_ssim_min_size",
    "psnr",
    "ssim_3d",
]
