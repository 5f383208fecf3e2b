"""What every volume pipeline shares: input checks, initial noise, scheduler plumbing, callbacks and outputs.

A pipeline built on [`VolumePipeline`] keeps its own denoising loop in `__call__`, written top to bottom, and calls
these pieces for the parts that are the same everywhere.
"""

from __future__ import annotations

import inspect
import logging as std_logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from ..io.nifti import nifti_image_to_tensor, save_nifti, tensor_to_nifti_image
from ..utils.validation import check_volume_tensor

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pt", "latent", "nifti")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")


@dataclass
class VolumePipelineOutput(BaseOutput):
    """Volumes produced by a pipeline, with their geometry.

    Args:
        volumes: `(B, C, D, H, W)` tensor (`output_type="pt"`) or array (`"np"`), latents (`"latent"`), or a list of
            `nibabel.Nifti1Image` (`"nifti"`). Intensities are the model's `[-1, 1]` space.
        affines: `(B, 4, 4)` voxel-to-world matrices of the volumes (tensor axes as NIfTI `(x, y, z)` = `(H, W, D)`).
        regions: Name of each volume's region (class), or `None` where a pipeline has no classes.
    """

    volumes: torch.Tensor | np.ndarray | list
    affines: np.ndarray
    regions: list[str] | None = None

    def output_paths(
        self, output: str | os.PathLike, indices: Sequence[int] | None = None, total: int | None = None
    ) -> list[str]:
        """The files [`save`] writes for `output` (see there), without writing anything."""
        output = os.fspath(output)
        count = len(self.volumes)
        indices = list(range(count)) if indices is None else list(indices)
        if len(indices) != count:
            raise ValueError(f"{len(indices)} indices for {count} volumes.")
        total = count if total is None else total
        if output.endswith(NIFTI_EXTENSIONS):
            if total == 1:
                return [output]
            extension = ".nii.gz" if output.endswith(".nii.gz") else ".nii"
            stem = output[: -len(extension)]
            return [f"{stem}_{index}{extension}" for index in indices]
        if os.path.splitext(output)[1] and not os.path.isdir(output):
            raise ValueError(
                f"Output {output!r} is neither a .nii/.nii.gz file nor a folder; use e.g. 'volume.nii.gz' or "
                "'outputs/'."
            )
        names = self.regions or ["volume"] * count
        return [os.path.join(output, f"{name}_{index}.nii.gz") for index, name in zip(indices, names)]

    def save(
        self, output: str | os.PathLike, indices: Sequence[int] | None = None, total: int | None = None
    ) -> list[str]:
        """Write every volume as NIfTI with its affine.

        `output` is a `.nii`/`.nii.gz` path (one volume; with several, an index is appended before the extension) or a
        folder, which then receives `<region>_<index>.nii.gz` files. `indices` number the volumes (default 0, 1, ...)
        and `total` is the size of the whole set they belong to (default: these volumes), for runs that write one set
        in parts, e.g. one part per process. Returns the paths written.
        """
        paths = self.output_paths(output, indices, total)
        volumes = self.volumes
        if isinstance(volumes, list):
            volumes = [nifti_image_to_tensor(image) for image in volumes]
        for path, volume, affine in zip(paths, volumes, self.affines):
            save_nifti(torch.as_tensor(volume).float(), path, affine=affine)
        return paths


# Latents above this many voxels are decoded slab by slab by default: volumes above 128³ with the 8x autoencoder,
# whose full decode needs about 2.3 GiB at 128³ and 28 GB at 256³.
LARGE_DECODE_LATENT_VOXELS = 16**3


def planned_decode(vqvae, latents: torch.Tensor, large_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS) -> str:
    """The decode [`decode_large_latents_in_slabs`] runs: `"blended tiles"`, `"exact slabs"` or `"full"`."""
    if vqvae.use_tiling:
        return "blended tiles"
    if vqvae.use_slab_decoding or latents.shape[2:].numel() > large_decode_threshold:
        return "exact slabs"
    return "full"


def decode_large_latents_in_slabs(
    vqvae, latents: torch.Tensor, large_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS, output_size=None
) -> torch.Tensor:
    """`vqvae.decode(latents, output_size=output_size).sample`, exactly slab by slab for large latents.

    Latents with more than `large_decode_threshold` voxels are decoded in bounded memory with the autoencoder's slab
    settings ([`~VQModel3D.enable_slab_decoding`]); smaller ones in full. A decode mode chosen on the autoencoder
    (blended tiles or slab decoding enabled) is used as it is.
    """
    if vqvae.use_slab_decoding or planned_decode(vqvae, latents, large_decode_threshold) != "exact slabs":
        return vqvae.decode(latents, output_size=output_size).sample
    vqvae.enable_slab_decoding(vqvae.slab_latent_size, vqvae.slab_memory_budget, vqvae.slab_axis)
    try:
        return vqvae.decode(latents, output_size=output_size).sample
    finally:
        vqvae.disable_slab_decoding()


def decode_normalized_latents(
    vqvae, latents: torch.Tensor, large_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS, output_size=None
) -> torch.Tensor:
    """Normalised diffusion latents → volumes with a [`VQModel3D`]: denormalise, quantise, decode (exactly slab by
    slab above `large_decode_threshold` latent voxels, see [`decode_large_latents_in_slabs`])."""
    latents = vqvae.denormalize_latents(latents.to(vqvae.dtype))
    return decode_large_latents_in_slabs(vqvae, latents, large_decode_threshold, output_size)


def _no_spurious_cast_warning(record) -> bool:
    """A logging filter dropping diffusers' "modules that should be kept in float32" warning."""
    return "should be kept in float32" not in record.getMessage()


def scale_model_input(scheduler, sample: torch.Tensor, timestep) -> torch.Tensor:
    """The scheduler's input scaling where it has one (Euler-type schedulers divide by a sigma term)."""
    if hasattr(scheduler, "scale_model_input"):
        return scheduler.scale_model_input(sample, timestep)
    return sample


def alpha_bar_at(scheduler, timestep) -> float | None:
    """`alpha_bar` of a discrete timestep, for schedulers that expose `alphas_cumprod`."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    if alphas_cumprod is None:
        return None
    index = int(round(float(timestep)))
    return float(alphas_cumprod[min(max(index, 0), len(alphas_cumprod) - 1)])


def bounds_predicted_sample(scheduler) -> bool:
    """Whether the scheduler clips or thresholds its `x0` estimate."""
    # A config can carry keys kept for other schedulers: only those this scheduler takes count.
    accepted = inspect.signature(type(scheduler).__init__).parameters
    config = scheduler.config
    return any(config.get(key, False) for key in ("clip_sample", "thresholding") if key in accepted)


@contextmanager
def thresholding_without_quantiles(scheduler) -> Iterator[None]:
    """While active, a scheduler's dynamic thresholding with `sample_max_value <= 1` clips without `torch.quantile`.

    diffusers' thresholding takes the `dynamic_thresholding_ratio` quantile `s` of `|x0|` per sample, clamps it to
    `[1, sample_max_value]` and maps `x0` to `clamp(x0, -s, s) / s`. With `sample_max_value <= 1` the clamp makes
    `s = sample_max_value` whatever the quantile, so the result is computed here directly: the same numbers, and no
    `torch.quantile`, which refuses samples of more than 2**24 voxels (a 257 x 256 x 256 CT). Schedulers without
    thresholding, or with `sample_max_value > 1`, are left as they are.
    """
    config = scheduler.config
    bound = float(config.get("sample_max_value", 1.0))
    if not (config.get("thresholding") and bound <= 1 and hasattr(scheduler, "_threshold_sample")):
        yield
        return
    scheduler._threshold_sample = lambda sample: sample.clamp(-bound, bound) / bound
    try:
        yield
    finally:
        del scheduler._threshold_sample


class VolumePipeline(DiffusionPipeline):
    """Base of the meddiffusers volume pipelines: the shared steps around each pipeline's own denoising loop.

    Subclasses register their components, write `__call__` with a visible loop, and use: [`check_output_type`],
    [`check_callback_inputs`], [`prepare_noise`] (after `scheduler.set_timesteps`), [`prepare_extra_step_kwargs`],
    [`postprocess`], and the `interrupt` / `num_timesteps` properties.
    """

    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe` (reuse another pipeline's components), without the float32-modules warning it logs
        for every model: it calls `.to(dtype=None)`, which casts nothing."""
        model_logger = std_logging.getLogger("diffusers.models.modeling_utils")
        model_logger.addFilter(_no_spurious_cast_warning)
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            model_logger.removeFilter(_no_spurious_cast_warning)

    @property
    def num_timesteps(self) -> int:
        """Number of denoising steps of the last call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a callback to stop the loop after the current step."""
        return getattr(self, "_interrupt", False)

    # ------------------------------------------------------------------------------------------------ checks

    @staticmethod
    def check_output_type(output_type: str) -> None:
        """Raise a `ValueError` unless `output_type` is one of `np`, `pt`, `latent`, `nifti`."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")

    def check_callback_inputs(
        self,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None,
    ) -> list[str]:
        """Validate the callback's tensor names; returns the names to hand it (a `PipelineCallback` brings its own)."""
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise ValueError(f"`callback_on_step_end` must be callable, got {type(callback_on_step_end).__name__}.")
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        names = list(callback_on_step_end_tensor_inputs or self._callback_tensor_inputs)
        unknown = [name for name in names if name not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}, got "
                f"{unknown}."
            )
        return names

    @staticmethod
    def check_generators(generator, batch_size: int) -> None:
        """A list of generators needs one per volume."""
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} volumes.")

    # ------------------------------------------------------------------------------------------------ sampling

    def prepare_noise(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        device: torch.device,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Initial noise of `shape` (or the given `latents`), scaled by the scheduler's `init_noise_sigma`.

        Call it after `scheduler.set_timesteps`: Euler-type schedulers derive `init_noise_sigma` from the timesteps.
        """
        self.check_generators(generator, shape[0])
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            check_volume_tensor(latents, "latents")
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"`latents` must have shape {tuple(shape)}, got {tuple(latents.shape)}.")
            latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        """`generator` and `eta` for `scheduler.step`, passed only to schedulers whose `step` accepts them.

        `eta` is DDIM's stochasticity (0 deterministic, 1 the ancestral sampler); other schedulers ignore it.
        """
        if eta < 0:
            raise ValueError(f"`eta` must be >= 0, got {eta}.")
        parameters = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in parameters:
            kwargs["eta"] = eta
        elif eta:
            logger.warning(f"{type(self.scheduler).__name__} has no `eta`; the value {eta} is ignored.")
        if "generator" in parameters:
            kwargs["generator"] = generator
        return kwargs

    def warn_if_unbounded_start(self, timesteps: torch.Tensor) -> None:
        """Warn when the first step's `alpha_bar` is tiny and the scheduler does not bound its `x0` estimate.

        There, the `x0` estimate divides the noise-prediction error by `sqrt(alpha_bar)` (about 1 / 64,000 at t = 999
        of the 3D MedDiffusion schedule) and the sample diverges.
        """
        if not len(timesteps) or bounds_predicted_sample(self.scheduler):
            return
        alpha_bar = alpha_bar_at(self.scheduler, timesteps[0])
        if alpha_bar is not None and alpha_bar < 1e-6:
            logger.warning(
                f"{type(self.scheduler).__name__} starts at t={int(timesteps[0])} where alpha_bar={alpha_bar:.1e} "
                "without clipping x0: expect a diverging sample. Build it with `from_config(pipe.scheduler.config)` "
                "(which sets timestep_spacing='leading'), or pass timestep_spacing='leading' / thresholding=True."
            )

    # ------------------------------------------------------------------------------------------------ outputs

    def finish(self, volumes, affines: np.ndarray, names, output_type: str, return_dict: bool, output_class=None):
        """Post-process the final volumes, release offloaded models, and return the output dataclass (an instance of
        `output_class`, [`VolumePipelineOutput`] by default) or the tuple `(volumes, affines, names)`."""
        volumes = self.postprocess(volumes, affines, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (volumes, affines, names)
        return (output_class or VolumePipelineOutput)(volumes=volumes, affines=affines, regions=names)

    @staticmethod
    def postprocess(volumes: torch.Tensor, affines: np.ndarray, output_type: str):
        """Volumes in the requested form: a float32 array (`np`), a tensor (`pt`, `latent`) or NIfTI images."""
        if output_type == "np":
            return volumes.float().cpu().numpy()
        if output_type == "nifti":
            volumes = volumes.float().cpu()
            return [tensor_to_nifti_image(volume[None], affine) for volume, affine in zip(volumes, affines)]
        return volumes
