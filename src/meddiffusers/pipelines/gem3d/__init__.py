"""GEM-3D: whole 3D volumes from a segmentation mask and one informed slice, by windowed pseudo-3D latent diffusion."""

from .mask_processing import (
    augment_abdomen_mask,
    augment_brain_mask,
    check_label_mask,
    encode_slices,
    prepare_image_slice,
    prepare_mask,
    resize_slices,
    scale_intensities,
    scale_labels,
)
from .pipeline_gem3d_volume import GEM3DVolumePipeline, GEM3DVolumePipelineOutput
from .scheduling import GEM3D_DDIM_CONFIG, gem3d_ddim_scheduler, original_ddim_timesteps, set_original_timesteps
from .window_schedule import Window, final_provenance, never_written_slices, plan_windows
