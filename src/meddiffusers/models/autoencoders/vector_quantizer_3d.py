"""Nearest-code vector quantiser for 5-D latents, with the EMA codebook buffers of the original checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from torch import nn


@dataclass
class VectorQuantizer3DOutput(BaseOutput):
    """Result of quantising a latent volume.

    Args:
        quantized (`torch.Tensor` of shape `(B, C, d, h, w)`):
            Nearest codebook vectors, in straight-through form (`latents + (codes - latents).detach()`) so that
            gradients reach the encoder.
        indices (`torch.LongTensor` of shape `(B, d, h, w)`): Index of the nearest code of every latent voxel.
        commit_loss (`torch.Tensor`): `commitment_cost * mean((latents - codes.detach()) ** 2)`.
    """

    quantized: torch.Tensor
    indices: torch.LongTensor
    commit_loss: torch.Tensor


class VectorQuantizer3D(nn.Module):
    """Codebook of `num_embeddings` vectors of size `embedding_dim`, kept as buffers.

    `embedding` is the codebook used for look-ups; `cluster_size` and `embedding_avg` are the exponential-moving-
    average statistics a codebook trained by EMA keeps (they are state, so original checkpoints round-trip).

    Args:
        num_embeddings: Number of codes.
        embedding_dim: Size of each code (the latent channels).
        commitment_cost: Weight of the commitment loss.
        distance_chunk_size: Latent vectors compared with the whole codebook at once, bounding the memory of the
            `(vectors, codes)` distance matrix.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, commitment_cost=0.25, distance_chunk_size=65536):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.distance_chunk_size = distance_chunk_size
        self.register_buffer("embedding", torch.randn(num_embeddings, embedding_dim))
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("embedding_avg", self.embedding.clone())

    def nearest_indices(self, latents: torch.Tensor) -> torch.LongTensor:
        """Index of the nearest code (squared L2; the lowest index wins ties) for every voxel of `(B, C, d, h, w)`."""
        batch, channels, depth, height, width = latents.shape
        vectors = latents.movedim(1, -1).reshape(-1, channels)
        codes = self.embedding.to(vectors.dtype)
        code_norms = (codes.t() ** 2).sum(dim=0, keepdim=True)
        indices = []
        for chunk in vectors.split(self.distance_chunk_size):
            distances = (chunk**2).sum(dim=1, keepdim=True) - 2 * chunk @ codes.t() + code_norms
            indices.append(distances.argmin(dim=1))
        return torch.cat(indices).reshape(batch, depth, height, width)

    def lookup(self, indices: torch.LongTensor) -> torch.Tensor:
        """Codebook vectors for integer `indices` of shape `(B, d, h, w)`, returned as `(B, C, d, h, w)`."""
        return F.embedding(indices, self.embedding).movedim(-1, 1)

    def forward(self, latents: torch.Tensor) -> VectorQuantizer3DOutput:
        indices = self.nearest_indices(latents)
        codes = self.lookup(indices).to(latents.dtype)
        commit_loss = self.commitment_cost * F.mse_loss(latents, codes.detach())
        quantized = latents + (codes - latents).detach()
        return VectorQuantizer3DOutput(quantized=quantized, indices=indices, commit_loss=commit_loss)
