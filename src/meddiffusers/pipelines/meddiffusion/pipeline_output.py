"""Output of the 3D MedDiffusion pipelines."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import BaseOutput

from ...io.nifti import save_nifti


@dataclass
class MedDiffusionPipelineOutput(BaseOutput):
    """Generated volumes with their geometry.

    Args:
        volumes: `(B, C, D, H, W)` tensor (`output_type="pt"`) or array (`"np"`), normalised latents (`"latent"`), or a
            list of `nibabel.Nifti1Image` (`"nifti"`). Intensities are the decoder's `[-1, 1]` model space.
        affines: `(B, 4, 4)` voxel-to-world matrices built from each region's spacing.
        regions: Canonical region name of each volume.
    """

    volumes: torch.Tensor | np.ndarray | list
    affines: np.ndarray
    regions: list[str]

    def save(self, output: str | os.PathLike) -> list[str]:
        """Write every volume as NIfTI.

        `output` is a `.nii`/`.nii.gz` path (one volume; with several, an index is appended) or a folder, which then
        receives `<region>_<index>.nii.gz` files. Returns the paths written.
        """
        output = os.fspath(output)
        volumes = self.volumes
        if isinstance(volumes, list):
            arrays = [torch.from_numpy(np.asarray(image.dataobj).transpose(2, 0, 1)[None].copy()) for image in volumes]
        else:
            arrays = [torch.as_tensor(volume) for volume in volumes]
        paths = []
        for index, (volume, affine, region) in enumerate(zip(arrays, self.affines, self.regions)):
            if output.endswith((".nii", ".nii.gz")):
                path = output
                if len(arrays) > 1:
                    stem, ext = (output[:-7], ".nii.gz") if output.endswith(".nii.gz") else (output[:-4], ".nii")
                    path = f"{stem}_{index}{ext}"
            else:
                path = os.path.join(output, f"{region}_{index}.nii.gz")
            paths.append(save_nifti(volume.float(), path, affine=affine))
        return paths
