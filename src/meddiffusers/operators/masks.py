"""Segmentation masks as ControlNet conditions."""

from __future__ import annotations

import torch


def segmentation_condition(labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """A label volume `(B, 1, D, H, W)` of integers as a one-channel condition in `[-1, 1]`.

    Label `k` of `num_classes` (default: the largest label + 1) maps to `2 k / (num_classes - 1) - 1`, so background
    is -1 like the images' background.
    """
    if labels.ndim != 5 or labels.shape[1] != 1:
        raise ValueError(f"Expected a (B, 1, D, H, W) label volume, got {tuple(labels.shape)}.")
    labels = labels.round().long()
    if labels.min() < 0:
        raise ValueError("Labels must be non-negative integers.")
    classes = num_classes or int(labels.max()) + 1
    if labels.max() >= classes:
        raise ValueError(f"Labels go up to {int(labels.max())} but `num_classes` is {classes}.")
    return labels.float() * (2.0 / max(classes - 1, 1)) - 1.0
