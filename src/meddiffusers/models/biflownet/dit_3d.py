"""Old import path; the DiT blocks now live in `meddiffusers.models.unets.biflownet.dit_3d`."""

from ..unets.biflownet.dit_3d import (
    AdaLNModulation,
    DiTBlock3D,
    DiTOutputLayer3D,
    DiTStage,
    FeedForward,
    TokenAttention,
    modulate,
)

__all__ = [
    "AdaLNModulation",
    "DiTBlock3D",
    "DiTOutputLayer3D",
    "DiTStage",
    "FeedForward",
    "TokenAttention",
    "modulate",
]
