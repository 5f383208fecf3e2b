"""Old import path; the embeddings now live in `meddiffusers.models.embeddings`."""

from ..embeddings import TwoLayerEmbedding, sincos_position_embedding_3d, sinusoidal_timestep_embedding

__all__ = ["TwoLayerEmbedding", "sincos_position_embedding_3d", "sinusoidal_timestep_embedding"]
