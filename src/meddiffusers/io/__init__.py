from .intensity import CT_WINDOWS, HUWindow, PercentileScaling
from .nifti import (
    NiftiVolume,
    affine_from_tensor_spacing,
    load_nifti,
    nifti_array_to_tensor,
    nifti_image_to_tensor,
    save_nifti,
    tensor_spacing_from_affine,
    tensor_to_nifti_array,
    tensor_to_nifti_image,
)
from .regions import Region, RegionRegistry, meddiff_fm_regions, meddiffusion_regions
