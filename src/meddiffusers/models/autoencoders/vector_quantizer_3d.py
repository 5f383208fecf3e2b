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

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost=0.25,
        decay: float = 0.99,
        restart_threshold: float = 1.0,
        distance_chunk_size=65536,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.commitment_cost = commitment_cost
        self.decay = decay
        self.restart_threshold = restart_threshold
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
        if self.training and self.decay is not None:
            self.update_codebook(latents.detach())
        indices = self.nearest_indices(latents)
        codes = self.lookup(indices).to(latents.dtype)
        commit_loss = self.commitment_cost * F.mse_loss(latents, codes.detach())
        quantized = latents + (codes - latents).detach()
        return VectorQuantizer3DOutput(quantized=quantized, indices=indices, commit_loss=commit_loss)

    # ----------------------------------------------------------------------------------------------- training

    @torch.no_grad()
    def update_codebook(self, latents: torch.Tensor) -> None:
        """One EMA step of the codebook on a batch of encoder outputs (training mode only).

        A fresh codebook (all counts zero) is first filled with randomly chosen encoder outputs. Then counts and sums
        of the vectors assigned to each code are averaged into `cluster_size` / `embedding_avg` with `decay`, codes
        are their Laplace-smoothed means, and codes used less than `restart_threshold` times (EMA count) restart at
        random encoder outputs. Under `torch.distributed`, statistics are summed and restarts come from rank 0.
        """
        vectors = latents.movedim(1, -1).reshape(-1, self.embedding_dim).float()
        if self.cluster_size.sum() == 0:
            sample = self._random_vectors(vectors)
            self.embedding.copy_(sample)
            self.embedding_avg.copy_(sample)
            self.cluster_size.fill_(1.0)
        indices = self.nearest_indices(latents)
        counts = torch.bincount(indices.reshape(-1), minlength=self.num_embeddings).to(vectors.dtype)
        sums = torch.zeros_like(self.embedding_avg).index_add_(0, indices.reshape(-1), vectors)
        if _distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-7) / (total + self.num_embeddings * 1e-7) * total
        self.embedding.copy_(self.embedding_avg / smoothed[:, None])
        if self.restart_threshold > 0:
            dead = (self.cluster_size < self.restart_threshold).to(vectors.dtype)[:, None]
            replacement = self._random_vectors(vectors)
            self.embedding.mul_(1 - dead).add_(replacement * dead)
            self.embedding_avg.mul_(1 - dead).add_(replacement * dead)
            self.cluster_size.mul_(1 - dead[:, 0]).add_(dead[:, 0])

    def _random_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """`num_embeddings` encoder outputs chosen at random (tiled with small noise when there are fewer)."""
        if vectors.shape[0] < self.num_embeddings:
            repeats = -(-self.num_embeddings // vectors.shape[0])
            noise = torch.randn(vectors.shape[0] * repeats, self.embedding_dim, device=vectors.device) * 0.01
            vectors = vectors.repeat(repeats, 1) + noise / self.embedding_dim**0.5
        chosen = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[: self.num_embeddings]].contiguous()
        if _distributed():
            torch.distributed.broadcast(chosen, src=0)
        return chosen


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()
