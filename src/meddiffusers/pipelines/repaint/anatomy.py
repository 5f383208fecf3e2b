"""Anatomy conditioning of restoration pipelines: the label volume a MedDiff-FM [`PatchUNet3DModel`] is conditioned
on, checked once per call and cropped per window by [`predict_windowed_noise`]."""

from __future__ import annotations

import numpy as np
import torch

from ...models import PatchUNet3DModel
from ...utils.validation import check_volume_tensor


def prepare_anatomy(unet, anatomy, batch: int, volume_size, device) -> torch.Tensor | None:
    """`anatomy` as a `(B, 1, D, H, W)` int64 tensor over the whole volume, or a `ValueError`.

    Args:
        unet: The pipeline's denoiser: anatomy needs a [`PatchUNet3DModel`] built with an `anatomy_encoding`.
        anatomy: `None`, or integer labels `(D, H, W)`, `(1, D, H, W)` or `(1 or B, 1, D, H, W)` (0 background,
            `1 .. num_anatomy_classes`), as a tensor or array.
        batch: Volumes in the call.
        volume_size: `(D, H, W)` of the volumes (model space of a pixel prior).
        device: Where the denoiser runs.
    """
    if anatomy is None:
        return None
    if not isinstance(unet, PatchUNet3DModel):
        name = type(unet).__name__
        raise ValueError(f"`anatomy` needs a PatchUNet3DModel prior; this pipeline's denoiser is a {name}.")
    if not unet.anatomy_channels:
        raise ValueError("`anatomy` was given but this PatchUNet3DModel takes none (its anatomy_encoding is None).")
    labels = anatomy if isinstance(anatomy, torch.Tensor) else torch.as_tensor(np.asarray(anatomy))
    while labels.ndim < 5:
        labels = labels[None]
    check_volume_tensor(labels, "anatomy", channels=1, allow_integer=True)
    if tuple(labels.shape[2:]) != tuple(volume_size) or labels.shape[0] not in (1, batch):
        raise ValueError(
            f"`anatomy` has shape {tuple(labels.shape)}; it must cover the volume (D, H, W) = {tuple(volume_size)} "
            f"for 1 or {batch} volume(s)."
        )
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ValueError("`anatomy` must hold integer labels (0 background).")
    labels = labels.long()
    classes = unet.config.num_anatomy_classes
    if labels.min() < 0 or labels.max() > classes:
        raise ValueError(f"`anatomy` labels must lie in [0, {classes}] (0 is background).")
    return labels.expand(batch, *labels.shape[1:]).to(device)
