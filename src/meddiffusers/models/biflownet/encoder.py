"""Old import path; the encoder half now lives in `meddiffusers.models.unets.biflownet.encoder`."""

from ..unets.biflownet.encoder import BiFlowNetEncoderMixin, EncoderState

__all__ = ["BiFlowNetEncoderMixin", "EncoderState"]
