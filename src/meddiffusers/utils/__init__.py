"""Volume utilities shared by models, pipelines, training and examples: sliding windows, pad/crop/resample."""

from .coordinates import window_coordinates
from .sliding_window import sliding_window_inference, window_locations, window_starts, window_weights
from .volume import (
    center_crop_or_pad,
    crop_to_size,
    pad_to_multiple,
    pad_to_size,
    resample_to_spacing,
    size_for_spacing,
)
from .volume_tiling import merge_patches, split_into_patches

__all__ = [
    "center_crop_or_pad",
    "crop_to_size",
    "merge_patches",
    "pad_to_multiple",
    "pad_to_size",
    "resample_to_spacing",
    "size_for_spacing",
    "sliding_window_inference",
    "split_into_patches",
    "window_coordinates",
    "window_locations",
    "window_starts",
    "window_weights",
]
