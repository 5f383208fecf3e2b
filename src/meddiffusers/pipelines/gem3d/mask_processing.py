"""GEM-3D's input preparation: label masks and image slices to the `[-1, 1]` model space, and their VAE latents.

The original data pipeline (`ldm/data/volume_dataset.py:39-63`) divides the label map by the dataset's largest label
(3 for the BraTS-style brain data, 4 for the abdomen data), maps it to `[-1, 1]` and resizes every slice to 512 x 512
(nearest neighbour for masks); image intensities are min-max scaled over the volume to `[-1, 1]`. The 2-D VAE sees
each slice repeated to 3 channels, and GEM-3D always *samples* its posterior (`get_first_stage_encoding`), so each
encoding draws one standard-normal tensor.

Tensors here are `(B, 1, D, H, W)` with `D` the slice axis (see [`~io.nifti`]).

The optional mask augmentations follow `inference_{brain,abdomen}_{icma,igma}.py`: the abdomen recipe rotates the
whole label map by up to 2.5 degrees about each axis (nearest neighbour); the brain recipe rotates and mirrors the
lesion labels and moves them 20 to 59 voxels towards the volume centre, where they replace the background.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATASET_MAX_LABEL = {"brain": 3, "abdomen": 4}
# Value the brain recipe gives to voxels that the rotation moved in from outside the volume: label -1 in [-1, 1] space
# (-1.67 in the original script).
OUTSIDE_VALUE = -5.0 / 3.0


def check_label_mask(mask: torch.Tensor, max_label: int, name: str = "mask") -> None:
    """Raise `ValueError` unless `mask` is a finite `(B, 1, D, H, W)` map of integer labels in `[0, max_label]`."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor or a NiftiVolume, got {type(mask).__name__}.")
    if mask.ndim != 5 or mask.shape[1] != 1:
        raise ValueError(
            f"`{name}` must be a label volume (D, H, W) or (B, 1, D, H, W), got shape {tuple(mask.shape)}."
        )
    if mask.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(mask.shape)}).")
    values = mask.double()
    if not torch.isfinite(values).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; a label map holds integers 0..{max_label}.")
    if (values != values.round()).any():
        raise ValueError(f"`{name}` must hold integer labels; found fractional values.")
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > max_label:
        raise ValueError(
            f"`{name}` labels must lie in [0, {max_label}] (`max_label`), found [{low}, {high}]. Pass the dataset's "
            "largest label as `max_label` (3 for the brain model, 4 for the abdomen model)."
        )


def scale_labels(mask: torch.Tensor, max_label: int) -> torch.Tensor:
    """Labels `0..max_label` to the model's `[-1, 1]` conditioning values: `2 * label / max_label - 1`."""
    return mask.float() / max_label * 2 - 1


def scale_intensities(volume: torch.Tensor) -> torch.Tensor:
    """Min-max scale each volume of a `(B, C, D, H, W)` batch to `[-1, 1]` (as the original's data loader)."""
    flat = volume.float().flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1, 1)
    return (volume.float() - low) / (high - low).clamp_min(torch.finfo(torch.float32).tiny) * 2 - 1


def resize_slices(volume: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize every slice of a `(B, C, D, H, W)` volume to `size = (H', W')`, keeping the slice count.

    `mode="nearest"` for label maps (the original resizes masks with order 0), `"bilinear"` (anti-aliased) for images.
    """
    B, C, D, H, W = volume.shape
    if (H, W) == tuple(size):
        return volume
    slices = volume.permute(0, 2, 1, 3, 4).reshape(B * D, C, H, W)
    if mode == "nearest":
        resized = F.interpolate(slices, size=size, mode="nearest-exact")
    else:
        resized = F.interpolate(slices, size=size, mode=mode, antialias=True, align_corners=False)
    return resized.reshape(B, D, C, *size).permute(0, 2, 1, 3, 4)


def prepare_mask(mask: torch.Tensor, max_label: int, resolution: int | tuple[int, int]) -> torch.Tensor:
    """A `(B, 1, D, H, W)` label map to the model's mask input: labels in `[-1, 1]`, slices resized (nearest)."""
    check_label_mask(mask, max_label)
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    return resize_slices(scale_labels(mask, max_label), size, mode="nearest")


def prepare_image_slice(volume: torch.Tensor, index: int, resolution: int | tuple[int, int]) -> torch.Tensor:
    """Slice `index` of a `(B, 1, D, H, W)` image volume as a `(B, 1, H', W')` model input in `[-1, 1]`.

    The volume is min-max scaled as a whole first (as the original data loader), then the slice is resized.
    """
    if not 0 <= index < volume.shape[2]:
        raise ValueError(f"Informed-slice index {index} is outside the volume's {volume.shape[2]} slices.")
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    scaled = scale_intensities(volume)[:, :, index : index + 1]
    return resize_slices(scaled, size, mode="bilinear")[:, :, 0]


def encode_slices(vae, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """VAE latents of `(N, 1, H, W)` slices: `scaling_factor * (mean + std * noise)`, the original's posterior sample.

    Args:
        vae: An `AutoencoderKL`.
        images: Slices in `[-1, 1]`, repeated to the VAE's 3 input channels here.
        noise: Standard-normal `(N, latent_channels, h, w)` tensor (the posterior draw).

    Returns:
        `(N, latent_channels, h, w)` scaled latents.
    """
    channels = vae.config.in_channels
    posterior = vae.encode(images.repeat(1, channels, 1, 1).to(vae.dtype)).latent_dist
    latents = posterior.mean + posterior.std * noise.to(posterior.mean)
    return latents * vae.config.scaling_factor


def _rotation_matrix(angles_deg: torch.Tensor) -> torch.Tensor:
    rotation = torch.eye(3, dtype=torch.float64)
    for axis, angle in enumerate(angles_deg.tolist()):
        c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        i, j = [a for a in range(3) if a != axis]
        step = torch.eye(3, dtype=torch.float64)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = step @ rotation
    return rotation


def _resample(volume: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor, padding_mode: str = "zeros"):
    """Nearest-neighbour resampling of a `(D, H, W)` volume: output voxel `v` reads input voxel
    `c + matrix @ (v - c) + offset` (`c` the volume centre, voxel units, `(D, H, W)` order)."""
    half = torch.tensor([max(n - 1, 1) / 2 for n in volume.shape], dtype=torch.float64)
    # affine_grid works in normalised (x, y, z) = (W, H, D) coordinates.
    normalised = torch.diag(1 / half) @ matrix @ torch.diag(half)
    theta = torch.cat([normalised.flip(0, 1), (offset / half).flip(0)[:, None]], dim=1)
    grid = F.affine_grid(theta[None].float(), (1, 1, *volume.shape), align_corners=True)
    sampled = F.grid_sample(
        volume[None, None].float(), grid, mode="nearest", padding_mode=padding_mode, align_corners=True
    )
    return sampled[0, 0]


def _random_angles(generator: torch.Generator | None, limit: float = 2.5) -> torch.Tensor:
    return (torch.rand(3, generator=generator, dtype=torch.float64) * 2 - 1) * limit


def augment_abdomen_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The abdomen mask augmentation of the original: a random rotation of up to 2.5 degrees about each axis.

    Args:
        mask: `(D, H, W)` label map in `[-1, 1]` (after [`scale_labels`]).
        generator: Draws the three angles (uniform in [-2.5, 2.5] degrees).

    Returns:
        The rotated map (nearest neighbour); voxels rotated in from outside the volume are background (-1).
    """
    rotation = _rotation_matrix(_random_angles(generator))
    # Shift by +2 so that background differs from the zero padding, as the original does with +0.1.
    rotated = _resample(mask.float() + 2, rotation.T, torch.zeros(3, dtype=torch.float64))
    return torch.where(rotated == 0, torch.full_like(rotated, -1.0), rotated - 2).to(mask.dtype)


def augment_brain_mask(mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The brain (lesion) mask augmentation of the original: rotate and mirror the lesion, then move it inwards.

    Steps (`inference_brain_icma.py:74-111`): the map is rotated by up to 2.5 degrees about each axis and mirrored
    along the last axis; the lesion voxels (value > -1) are moved towards the volume centre, along the direction from
    their centre of mass to it, by half of a random 20..59 (the original's normalised translation `shift / size`
    amounts to `shift / 2` voxels; it also pairs the axes in reverse order, which is not kept here), and written over
    a background of -1; voxels the rotation brought in from outside the volume get the value -5/3 (label -1) as in
    the original. Not bit-identical to the original, which rotates with `volumentations`.

    Args:
        mask: `(D, H, W)` label map in `[-1, 1]` (after [`scale_labels`]).
        generator: Draws the angles and the shift.

    Returns:
        The augmented `(D, H, W)` map.
    """
    rotation = _rotation_matrix(_random_angles(generator))
    moved = _resample(mask.float() + 2, rotation.T, torch.zeros(3, dtype=torch.float64)).flip(
        -1
    )  # 0 marks voxels from outside the volume
    inside = moved != 0
    lesion = torch.where(inside & (moved > 1), moved - 2, torch.full_like(moved, -1.0))
    shift = int(torch.randint(20, 60, (1,), generator=generator))
    zone = (lesion > -1).nonzero().double()
    result = torch.full_like(moved, -1.0)
    if len(zone):
        centre = torch.tensor([(n - 1) / 2 for n in mask.shape], dtype=torch.float64)
        direction = centre - zone.mean(dim=0)
        norm = direction.norm()
        if norm > 0:
            direction = direction / norm
        # Moving the content by +v voxels reads the input at -v.
        lesion = _resample(lesion, torch.eye(3, dtype=torch.float64), -direction * shift / 2, padding_mode="border")
        result = torch.where(lesion > -1, lesion, result)
    result[~inside] = OUTSIDE_VALUE
    return result.to(mask.dtype)
