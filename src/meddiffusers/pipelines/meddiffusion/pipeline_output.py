"""Output of the 3D MedDiffusion pipelines."""

from __future__ import annotations

from dataclasses import dataclass

from ..pipeline_utils_3d import VolumePipelineOutput


@dataclass
class MedDiffusionPipelineOutput(VolumePipelineOutput):
    """Generated volumes, their affines (from each region's spacing) and their canonical region names.

    The fields and `.save()` are those of [`VolumePipelineOutput`].
    """
