"""Linear degradation operators and the conditions built from them (sparse-view CT, accelerated MRI, thick slices,
masks)."""

from .ct import RayTransform, sparse_view_ct_condition
from .masks import segmentation_condition
from .mri import UndersampledMRI, cartesian_mask, poisson_disc_mask, undersampled_mri_condition
from .slices import slice_average_pool, thick_slice_condition
