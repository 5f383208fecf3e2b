from .diffpir import DiffPIRPipeline, DiffPIRSchedule, IntensityMap, diffpir_timesteps
from .gem3d import GEM3DVolumePipeline, GEM3DVolumePipelineOutput, gem3d_ddim_scheduler
from .meddiff_fm import AnomalyDetectionOutput, PatchSlidingWindowPipeline
from .meddiffusion import MedDiffusionControlNetPipeline, MedDiffusionPipeline, MedDiffusionPipelineOutput
from .pipeline_utils_3d import VolumePipeline, VolumePipelineOutput
from .repaint import RePaint3DPipeline
