"""Shared embeddings: the sinusoidal timestep encoding, the two-layer MLP and the 3D sin-cos position grid."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding

from meddiffusers.models.embeddings import (
    TwoLayerEmbedding,
    fourier_position_encoding,
    position_encoding_channels,
    sincos_position_embedding_3d,
    sinusoidal_timestep_embedding,
)


def timestep_formula(timesteps, dim):
    """`[sin(t·f_i) ‖ cos(t·f_i)]`, `f_i = 10000^(-i / (dim/2 - 1))`, written out element by element in float64."""
    half = dim // 2
    rows = []
    for t in timesteps.tolist():
        frequencies = [math.exp(-math.log(10000) * i / (half - 1)) for i in range(half)]
        rows.append([math.sin(t * f) for f in frequencies] + [math.cos(t * f) for f in frequencies])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dim", [6, 72])
def test_timestep_embedding_equals_the_formula(dim):
    timesteps = torch.tensor([0, 1, 17, 999])
    embedding = sinusoidal_timestep_embedding(timesteps, dim)
    assert embedding.dtype == torch.float32 and embedding.shape == (4, dim)
    torch.testing.assert_close(embedding.double(), timestep_formula(timesteps, dim), atol=2e-4, rtol=0)
    # t = 0: every sine is 0 and every cosine 1; the first frequency is 1, so column 0 is sin(t).
    assert embedding[0, : dim // 2].abs().max() == 0 and torch.all(embedding[0, dim // 2 :] == 1)
    torch.testing.assert_close(embedding[:, 0], torch.sin(timesteps.float()))


def test_timestep_embedding_keeps_the_original_float32_order_and_is_diffusers_maths():
    timesteps = torch.arange(1000)
    embedding = sinusoidal_timestep_embedding(timesteps, 72)
    # The 3D MedDiffusion code: scale the exponent by ln(10000)/(half-1) first, then exponentiate, all in float32.
    exponent = torch.arange(36, dtype=torch.float32) * -(math.log(10000) / 35)
    arguments = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    assert torch.equal(embedding, torch.cat([arguments.sin(), arguments.cos()], dim=-1))
    # diffusers computes the same formula with another float32 rounding order.
    diffusers_embedding = get_timestep_embedding(timesteps, 72, flip_sin_to_cos=False, downscale_freq_shift=1)
    torch.testing.assert_close(embedding, diffusers_embedding, atol=1e-4, rtol=0)


def test_timestep_embedding_takes_float_and_scalar_timesteps():
    fractional = sinusoidal_timestep_embedding(torch.tensor([2.5]), 8)
    torch.testing.assert_close(fractional.double(), timestep_formula(torch.tensor([2.5]), 8), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        sinusoidal_timestep_embedding(torch.tensor(3), 8), sinusoidal_timestep_embedding(torch.tensor([3]), 8)
    )


@pytest.mark.parametrize("activation, function", [("gelu", F.gelu), ("silu", F.silu)])
def test_two_layer_embedding_is_linear_activation_linear(activation, function):
    torch.manual_seed(0)
    mlp = TwoLayerEmbedding(3, 5, activation=activation)
    assert sorted(mlp.state_dict()) == ["linear_1.bias", "linear_1.weight", "linear_2.bias", "linear_2.weight"]
    x = torch.randn(4, 3)
    torch.testing.assert_close(mlp(x), mlp.linear_2(function(mlp.linear_1(x))))


def test_sincos_position_embedding_3d_gives_each_axis_a_third_of_the_features():
    grid = sincos_position_embedding_3d(12, 3)
    assert grid.shape == (27, 12)
    # Token index = d * 9 + h * 3 + w; features [D ‖ H ‖ W], each [sin ‖ cos] with frequencies 10000^(-2j/4).
    d, h, w = 2, 0, 1
    token = grid[d * 9 + h * 3 + w]
    for axis, position in enumerate((d, h, w)):
        frequencies = torch.tensor([1.0, 10000**-0.5], dtype=torch.float64)
        expected = torch.cat([torch.sin(position * frequencies), torch.cos(position * frequencies)]).float()
        torch.testing.assert_close(token[4 * axis : 4 * axis + 4], expected)
    with pytest.raises(ValueError, match="divisible by 6"):
        sincos_position_embedding_3d(8, 2)


def test_fourier_position_encoding_matches_its_formula():
    position = torch.rand(2, 3, 2, 3, 4) * 2 - 1
    encoded = fourier_position_encoding(position, num_frequencies=3)
    assert encoded.shape[1] == position_encoding_channels(3) == 21
    torch.testing.assert_close(encoded[:, :3], position)
    torch.testing.assert_close(encoded[:, 3:6], torch.sin(math.pi * position))
    torch.testing.assert_close(encoded[:, 6:9], torch.cos(math.pi * position))
    torch.testing.assert_close(encoded[:, 15:18], torch.sin(4 * math.pi * position))
    assert fourier_position_encoding(position, 2, include_input=False).shape[1] == 12


def test_slice_position_embedding_matches_gem3d_positional_embedder():
    from safetensors.torch import load_file

    from meddiffusers.models.embeddings import slice_position_embedding
    from tests.conftest import FIXTURES

    tensors = load_file(FIXTURES / "gem3d_tiny" / "inputs_outputs.safetensors")
    positions = torch.tensor([3 / 20, 17 / 20])  # the fixture's (k, S) pairs, float32 as in the original
    assert torch.equal(positions, tensors["slice_pos"])
    embedding = slice_position_embedding(positions, dim=128)
    torch.testing.assert_close(embedding, tensors["slice_pos_embedding"], atol=1e-6, rtol=0)
    # [cos ‖ sin] of 1000·p·exp(-ln(10000)·i/64), i < 64 (float64 reference).
    arguments = 1000 * positions.double()[:, None] * torch.exp(-math.log(10000) * torch.arange(64.0) / 64)[None]
    torch.testing.assert_close(embedding.double(), torch.cat([arguments.cos(), arguments.sin()], 1), atol=2e-4, rtol=0)
    assert torch.equal(slice_position_embedding(0.15, dim=128)[0], embedding[0])
    with pytest.raises(ValueError, match="even"):
        slice_position_embedding(positions, dim=7)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        slice_position_embedding(positions[None], dim=128)
