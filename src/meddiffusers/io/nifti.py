"""NIfTI volumes to and from `(B, C, D, H, W)` tensors, keeping the affine and header.

Axis convention: a NIfTI data array is indexed `(x, y, z[, c])`. Tensors are `(B, C, D, H, W)` with `D` the image's
z axis, `H` its x axis and `W` its y axis (the order the released 3D MedDiffusion weights were trained in). This
module is the only place that transposes between the two.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
import torch
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

# What nibabel, gzip and zlib raise for files that are not (complete, valid) NIfTI images.
_UNREADABLE = (OSError, EOFError, ValueError, zlib.error, ImageFileError, HeaderDataError)


@dataclass
class NiftiVolume:
    """A volume in tensor layout with the geometry of the file it came from.

    Args:
        tensor: `(1, C, D, H, W)` float tensor (`D` = z, `H` = x, `W` = y of the NIfTI array).
        affine: 4x4 voxel-to-world (RAS+ millimetre) matrix of the NIfTI array.
        header: The NIfTI header (a copy), used when saving so that units, codes and descriptions are kept.
    """

    tensor: torch.Tensor
    affine: np.ndarray
    header: nib.Nifti1Header | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres in tensor order `(D, H, W)`, i.e. `(z, x, y)` of the file."""
        return tensor_spacing_from_affine(self.affine)

    @property
    def orientation(self) -> tuple[str, str, str]:
        """Anatomical direction of the file's `(x, y, z)` array axes, e.g. `('R', 'A', 'S')`."""
        return nib.aff2axcodes(self.affine)

    def save(self, path: str | os.PathLike) -> None:
        """Write this volume to `path` (`.nii` or `.nii.gz`)."""
        save_nifti(self.tensor, path, affine=self.affine, header=self.header)


def nifti_array_to_tensor(array: np.ndarray) -> torch.Tensor:
    """`(x, y, z)` or `(x, y, z, c)` array to a `(1, C, D, H, W)` = `(1, C, z, x, y)` tensor."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4:
        raise ValueError(
            f"Expected a 3D NIfTI volume (x, y, z) or a 4D one with channels (x, y, z, c); got shape {array.shape}."
        )
    return torch.from_numpy(np.ascontiguousarray(array.transpose(3, 2, 0, 1)))[None]


def tensor_to_nifti_array(tensor: torch.Tensor) -> np.ndarray:
    """`(1, C, D, H, W)`, `(C, D, H, W)` or `(D, H, W)` tensor to an `(x, y, z)` (or `(x, y, z, c)`) array."""
    if tensor.ndim == 5:
        if tensor.shape[0] != 1:
            raise ValueError(
                f"Save one volume at a time; got a batch of {tensor.shape[0]} (shape {tuple(tensor.shape)})."
            )
        tensor = tensor[0]
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise ValueError(f"Expected a (1, C, D, H, W), (C, D, H, W) or (D, H, W) tensor; got {tuple(tensor.shape)}.")
    array = tensor.detach().cpu().numpy().transpose(2, 3, 1, 0)
    return array[..., 0] if array.shape[-1] == 1 else array


def tensor_spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in tensor order `(D, H, W)` = `(z, x, y)` from a NIfTI affine."""
    zooms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return float(zooms[2]), float(zooms[0]), float(zooms[1])


def affine_from_tensor_spacing(spacing: tuple[float, float, float], origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Diagonal (RAS-aligned) affine for a tensor-order spacing `(D, H, W)` = `(z, x, y)` in millimetres."""
    spacing_d, spacing_h, spacing_w = spacing
    affine = np.diag([spacing_h, spacing_w, spacing_d, 1.0])
    affine[:3, 3] = origin
    return affine


def load_nifti(path: str | os.PathLike, dtype: torch.dtype = torch.float32, canonical: bool = False) -> NiftiVolume:
    """Load a NIfTI file as a `(1, C, D, H, W)` tensor with its affine and header.

    Args:
        path: `.nii` or `.nii.gz` file.
        dtype: Floating dtype of the returned tensor (scaling slope/intercept of the file are applied).
        canonical: Reorient the data to the closest RAS+ orientation first (`nibabel.as_closest_canonical`);
            by default the array is kept exactly as stored, with its own affine.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a readable NIfTI image (truncated, corrupt or another format; the message names
            the file) or not 3D (or 3D + channels).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"NIfTI file not found: {path!r}.")
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    # nibabel reads the header eagerly and the voxels lazily: read both here, so that a truncated or corrupt file
    # fails with one clear error instead of an EOFError or zlib error from deep inside the first data access.
    try:
        image = nib.load(path)
        if canonical:
            image = nib.as_closest_canonical(image)
        if image.get_data_dtype() == numpy_dtype:
            array = np.asanyarray(image.dataobj).astype(numpy_dtype)
        else:
            array = image.get_fdata(dtype=np.float64).astype(numpy_dtype)
    except _UNREADABLE as error:
        message = " ".join(str(error).split())  # nibabel's messages can span several lines
        raise ValueError(
            f"Could not read {path!r} as NIfTI ({type(error).__name__}: {message}); the file may be truncated or "
            "corrupt, or not a NIfTI image."
        ) from None
    try:
        tensor = nifti_array_to_tensor(array)
    except ValueError as error:
        raise ValueError(f"{path!r}: {error}") from None
    return NiftiVolume(tensor=tensor, affine=image.affine.copy(), header=image.header.copy())


def tensor_to_nifti_image(
    volume: torch.Tensor, affine: np.ndarray | None = None, header: nib.Nifti1Header | None = None
) -> nib.Nifti1Image:
    """A `(1, C, D, H, W)`, `(C, D, H, W)` or `(D, H, W)` tensor as an in-memory `nibabel.Nifti1Image`.

    Integer and float16 data are stored as float32; the scaling slope and intercept are reset to 1 and 0.
    """
    array = tensor_to_nifti_array(volume)
    if not np.issubdtype(array.dtype, np.floating) or array.dtype == np.float16:
        array = array.astype(np.float32)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine, header=header.copy() if header is not None else None)
    image.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    return image


def nifti_image_to_tensor(image: nib.Nifti1Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The data of an in-memory NIfTI image as a `(1, C, D, H, W)` tensor (inverse of [`tensor_to_nifti_image`])."""
    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return nifti_array_to_tensor(np.asanyarray(image.dataobj).astype(numpy_dtype))


def save_nifti(
    volume: torch.Tensor | NiftiVolume,
    path: str | os.PathLike,
    affine: np.ndarray | None = None,
    header: nib.Nifti1Header | None = None,
) -> str:
    """Save a tensor (or [`NiftiVolume`]) as NIfTI, undoing the tensor transposition.

    Args:
        volume: `(1, C, D, H, W)`, `(C, D, H, W)` or `(D, H, W)` tensor, or a `NiftiVolume`.
        path: Output `.nii` / `.nii.gz` path; parent folders are created.
        affine: 4x4 affine (defaults to the volume's, else identity).
        header: Header to copy units and codes from (defaults to the volume's).

    Returns:
        The path written.
    """
    if isinstance(volume, NiftiVolume):
        affine = volume.affine if affine is None else affine
        header = volume.header if header is None else header
        volume = volume.tensor
    image = tensor_to_nifti_image(volume, affine, header)
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    nib.save(image, path)
    return path
