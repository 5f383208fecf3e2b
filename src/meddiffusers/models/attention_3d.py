"""Old import path; the attention layers now live in `meddiffusers.models.attention`."""

from .attention import VolumeAttention, VolumeAttnProcessor, VolumeXFormersAttnProcessor

__all__ = ["VolumeAttention", "VolumeAttnProcessor", "VolumeXFormersAttnProcessor"]
