"""DiffPIR: plug-and-play restoration of volumes with a diffusion prior and a linear operator."""

from .intensity_map import IntensityMap
from .pipeline_diffpir import DiffPIRPipeline, DiffPIRSchedule, diffpir_timesteps
