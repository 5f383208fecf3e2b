from .diffpir import DiffPIRPipeline, DiffPIRSchedule, IntensityMap, diffpir_timesteps
from .meddiff_fm import AnomalyDetectionOutput, PatchSlidingWindowPipeline
from .meddiffusion import MedDiffusionControlNetPipeline, MedDiffusionPipeline, MedDiffusionPipelineOutput
from .pipeline_utils_3d import VolumePipeline, VolumePipelineOutput
from .repaint import RePaint3DPipeline
