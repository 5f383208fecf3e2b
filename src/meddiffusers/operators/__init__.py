"""Linear degradation operators and the conditions built from them (sparse-view CT, accelerated MRI, thick slices,
masks).

Every operator is a [`LinearOperator`]: `forward`, exact `adjoint`, `normal`, `prox_l2` (closed form or conjugate
gradients), `opnorm`, and `pinv` where one exists.
"""

from .base import IdentityOperator, LinearOperator, conjugate_gradient
from .ct import RayTransform, sparse_view_ct_condition
from .inpainting import MaskOperator
from .masks import segmentation_condition
from .mri import UndersampledMRI, cartesian_mask, poisson_disc_mask, undersampled_mri_condition
from .pooling import AveragePoolOperator
from .slices import slice_average_pool, thick_slice_condition
