"""Timestep, class, resolution and position embeddings of BiFlowNet."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """`[sin(t·f) ‖ cos(t·f)]` with `f_i = exp(-ln(10000) · i / (dim / 2 - 1))`, computed in float32."""
    half = dim // 2
    exponent = torch.arange(half, device=timesteps.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
    arguments = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([arguments.sin(), arguments.cos()], dim=-1)


class TwoLayerEmbedding(nn.Module):
    """`Linear -> activation -> Linear`, the MLP that turns a timestep or resolution encoding into a vector."""

    def __init__(self, in_features: int, out_features: int, activation: str):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)
        self.activation = activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_1(inputs)
        hidden = F.gelu(hidden) if self.activation == "gelu" else F.silu(hidden)
        return self.linear_2(hidden)


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_position_embedding_3d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding of a `grid_size³` token grid, `(grid_size³, embed_dim)`.

    Each axis gets `embed_dim / 3` features ([D ‖ H ‖ W]); tokens are ordered D-major, W fastest.
    """
    if embed_dim % 6:
        raise ValueError(f"The DiT width must be divisible by 6 for a 3D sin-cos embedding, got {embed_dim}.")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_d, grid_h, grid_w = np.meshgrid(coords, coords, coords, indexing="ij")
    parts = [_sincos_1d(embed_dim // 3, axis) for axis in (grid_d, grid_h, grid_w)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()
