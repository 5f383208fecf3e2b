"""Timestep, vector and position embeddings shared by the diffusion models."""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """`[sin(t·f) ‖ cos(t·f)]` with `f_i = exp(-ln(10000) · i / (dim / 2 - 1))`, computed in float32.

    Mathematically this is diffusers' `get_timestep_embedding(t, dim, flip_sin_to_cos=False,
    downscale_freq_shift=1)`, but that function orders the float32 operations differently (it divides the exponents
    after scaling them), which moves values by up to 7e-5 at t≈999. The operations here follow the 3D MedDiffusion
    code, so converted models see the embeddings they were trained with.

    Args:
        timesteps: One timestep per batch item, shape `(B,)` (integers or floats).
        dim: Width of the embedding (even).
    """
    half = dim // 2
    exponent = torch.arange(half, device=timesteps.device, dtype=torch.float32) * -(math.log(10000) / (half - 1))
    arguments = timesteps.reshape(-1).float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([arguments.sin(), arguments.cos()], dim=-1)


class TwoLayerEmbedding(TimestepEmbedding):
    """`Linear -> activation -> Linear` (`linear_1`, `linear_2`): the MLP that turns an encoding into a vector.

    diffusers' `TimestepEmbedding` with the activation named `activation`; it embeds timestep encodings as well as
    other small vectors (BiFlowNet's resolution condition).

    Args:
        in_features: Width of the encoding.
        out_features: Width of both linear layers' outputs.
        activation: `"gelu"` or `"silu"` (any name diffusers' `get_activation` knows).
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "silu"):
        super().__init__(in_features, out_features, act_fn=activation)


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_position_embedding_3d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 3D sin-cos position embedding of a `grid_size³` token grid, `(grid_size³, embed_dim)`.

    Each axis gets `embed_dim / 3` features ([D ‖ H ‖ W]); tokens are ordered D-major, W fastest.

    Args:
        embed_dim: Token width (divisible by 6).
        grid_size: Tokens per side.
    """
    if embed_dim % 6:
        raise ValueError(f"The DiT width must be divisible by 6 for a 3D sin-cos embedding, got {embed_dim}.")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_d, grid_h, grid_w = np.meshgrid(coords, coords, coords, indexing="ij")
    parts = [_sincos_1d(embed_dim // 3, axis) for axis in (grid_d, grid_h, grid_w)]
    return torch.from_numpy(np.concatenate(parts, axis=1)).float()


def fourier_position_encoding(
    position: torch.Tensor, num_frequencies: int, include_input: bool = True
) -> torch.Tensor:
    """NeRF-style encoding of coordinate maps: `[p, sin(2^k π p), cos(2^k π p)]` for `k < num_frequencies`.

    Args:
        position: `(B, 3, D, H, W)` coordinates (in `[-1, 1]` for global window positions).
        num_frequencies: Number of octaves `L` (0 keeps only the raw coordinates).
        include_input: Keep the raw coordinates as the first 3 channels.

    Returns:
        `(B, 3 * include_input + 6 * L, D, H, W)`: the raw channels, then per frequency the sines of the three
        coordinates followed by their cosines.
    """
    channels = [position] if include_input else []
    for k in range(num_frequencies):
        angle = position * (math.pi * 2.0**k)
        channels += [torch.sin(angle), torch.cos(angle)]
    if not channels:
        raise ValueError("The position encoding is empty: use num_frequencies > 0 or include_input=True.")
    return torch.cat(channels, dim=1)


def position_encoding_channels(num_frequencies: int, include_input: bool = True) -> int:
    """Channels of [`fourier_position_encoding`] for 3D coordinates."""
    return 3 * int(include_input) + 6 * num_frequencies


def slice_position_embedding(positions: torch.Tensor, dim: int = 128) -> torch.Tensor:
    """GEM-3D's slice-position condition: `[cos(1000·p·f) ‖ sin(1000·p·f)]`, `f_i = exp(-ln(10000) · i / (dim / 2))`.

    The informed-slice generator is conditioned on the relative position `p = k / S` of slice `k` in a volume of `S`
    slices (the original `PositionalEmbedder`): the timestep-style sinusoidal embedding of `1000 · p`, computed by
    diffusers' `get_timestep_embedding` (cosines first, no frequency shift) in float32. Use it as one context token,
    `encoder_hidden_states = slice_position_embedding(p)[:, None]`.

    Args:
        positions: Relative slice positions `(B,)` (a number is one position), in `[0, 1]`.
        dim: Width of the embedding (even; 128 in GEM-3D).

    Returns:
        `(B, dim)` float32 embeddings.
    """
    positions = torch.as_tensor(positions, dtype=torch.float32)
    if positions.ndim > 1:
        raise ValueError(f"`positions` must be a number or a (B,) tensor, got shape {tuple(positions.shape)}.")
    if dim <= 0 or dim % 2:
        raise ValueError(f"`dim` must be a positive even number, got {dim}.")
    if not torch.isfinite(positions).all():
        raise ValueError("`positions` must be finite.")
    return get_timestep_embedding(1000 * positions.reshape(-1), dim, flip_sin_to_cos=True, downscale_freq_shift=0)
