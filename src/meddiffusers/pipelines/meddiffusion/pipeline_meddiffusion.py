"""`MedDiffusionPipeline`: class-conditional 3D latent diffusion (3D MedDiffusion, Wang et al., IEEE TMI 2025)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import nibabel as nib
import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from ...io.nifti import affine_from_tensor_spacing, tensor_to_nifti_array
from ...io.regions import Region, RegionRegistry, meddiffusion_regions
from ...models.autoencoders.vq_model_3d import VQModel3D
from .pipeline_output import MedDiffusionPipelineOutput

OUTPUT_TYPES = ("np", "pt", "latent", "nifti")


class MedDiffusionPipeline(DiffusionPipeline):
    r"""Generate CT and MRI volumes of a chosen region with 3D MedDiffusion.

    The denoiser works on the normalised latent space of a Patch-Volume autoencoder; the sample is denormalised to
    the codebook's range and decoded by the autoencoder's joint decoder (overlapping tiles above
    `tiled_decode_threshold` latent voxels).

    Components:
        vqvae ([`VQModel3D`]): Patch-Volume autoencoder.
        unet ([`BiFlowNet3DModel`]): Class-conditional noise estimator.
        scheduler ([`SchedulerMixin`]): Any diffusers scheduler; [`MedDiffusionDDIMScheduler`] reproduces the
            original DDIM sampler and `DDPMScheduler(trained_betas=..., clip_sample=True)` its DDPM sampler.

    Configuration (saved in `model_index.json`):
        regions (`list[dict]`): The model's classes, their aliases, default sizes and spacings (see
            [`~io.regions.RegionRegistry`]). Defaults to the seven classes of the released model.
        tiled_decode_threshold (`int`): Latents with more voxels than this are decoded in overlapping tiles.
    """

    model_cpu_offload_seq = "unet->vqvae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vqvae: VQModel3D,
        unet,
        scheduler,
        regions: list[dict] | None = None,
        tiled_decode_threshold: int = 32**3,
    ):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        registry = RegionRegistry(regions) if regions is not None else meddiffusion_regions()
        self.register_to_config(regions=registry.to_config(), tiled_decode_threshold=tiled_decode_threshold)
        self.region_registry = registry

    # ------------------------------------------------------------------------------------------------ helpers

    @property
    def vqvae_factor(self) -> int:
        """Voxels per latent voxel along each axis."""
        return self.vqvae.downsample_factor

    def get_region(self, region: str | int) -> Region:
        """Resolve a region name, alias or class id; unknown names raise a `ValueError` listing the valid ones."""
        return self.region_registry.resolve(region)

    def _latent_size(self, volume_size) -> tuple[int, int, int]:
        factor = self.vqvae_factor
        multiple = getattr(self.unet, "latent_size_multiple", 8)
        sizes = tuple(int(side) for side in volume_size)
        if len(sizes) != 3 or any(side <= 0 or side % (factor * multiple) for side in sizes):
            raise ValueError(
                f"`volume_size` must be three positive sides (D, H, W) divisible by {factor * multiple} (autoencoder "
                f"factor {factor} x denoiser multiple {multiple}); got {volume_size!r}."
            )
        return tuple(side // factor for side in sizes)

    def check_inputs(self, regions, volume_size, latents, output_type, callback_on_step_end_tensor_inputs):
        """Validate the call's arguments before any model runs."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if callback_on_step_end_tensor_inputs and any(
            name not in self._callback_tensor_inputs for name in callback_on_step_end_tensor_inputs
        ):
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be a subset of {self._callback_tensor_inputs}."
            )
        if volume_size is None:
            missing = [region.name for region in regions if region.volume_size is None]
            if missing:
                raise ValueError(f"Regions {missing} have no default size; pass `volume_size=(D, H, W)`.")
            sizes = {tuple(region.volume_size) for region in regions}
            if len(sizes) > 1:
                raise ValueError(
                    f"The requested regions have different default sizes {sorted(sizes)}; pass `volume_size` or "
                    "generate them in separate calls."
                )
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
                raise ValueError("`latents` must be a (B, C, d, h, w) tensor.")
            if not torch.isfinite(latents).all():
                raise ValueError("`latents` contains NaN or infinite values.")

    def prepare_latents(self, batch_size, latent_size, dtype, device, generator, latents=None) -> torch.Tensor:
        """Initial noise `(B, C, d, h, w)` scaled by the scheduler's `init_noise_sigma`."""
        shape = (batch_size, self.unet.config.in_channels, *latent_size)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} volumes.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` must have shape {shape}, got {tuple(latents.shape)}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents → volumes: denormalise to the codebook range, quantise, decode."""
        latents = self.vqvae.denormalize_latents(latents.to(self.vqvae.dtype))
        use_tiling = latents.shape[2:].numel() > self.config.tiled_decode_threshold
        was_tiling = self.vqvae.use_tiling
        self.vqvae.use_tiling = was_tiling or use_tiling
        try:
            return self.vqvae.decode(latents).sample
        finally:
            self.vqvae.use_tiling = was_tiling

    # ------------------------------------------------------------------------------------------------ call

    @property
    def num_timesteps(self) -> int:
        """Number of denoising steps of the last call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` from a callback to stop early."""
        return getattr(self, "_interrupt", False)

    @torch.no_grad()
    def __call__(
        self,
        region: str | int | list[str | int] = "MRBrainT1",
        num_inference_steps: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_volumes_per_region: int = 1,
        volume_size: tuple[int, int, int] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MedDiffusionPipelineOutput | tuple:
        r"""Generate volumes.

        Args:
            region: Region name, alias or class id (or a list of them), e.g. `"MRBrain"`, `"CTLegs"`, `3`.
            num_inference_steps: Denoising steps.
            generator: One `torch.Generator` or one per volume, for reproducible noise.
            num_volumes_per_region: Volumes generated for each requested region.
            volume_size: Output size `(D, H, W)` in voxels; defaults to the region's trained size. Each side must
                be divisible by the autoencoder factor times 8.
            latents: Initial noise of shape `(B, C, d, h, w)` instead of sampling it.
            output_type: `"np"`, `"pt"`, `"latent"` (normalised latents, no decoding) or `"nifti"` (a list of
                `nibabel.Nifti1Image` with each region's spacing).
            return_dict: Return a [`MedDiffusionPipelineOutput`] rather than a tuple.
            callback_on_step_end: Called after every step as `callback(pipe, step, timestep, kwargs)`; may return a
                dict replacing any of `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback (`["latents"]`).

        Returns:
            [`MedDiffusionPipelineOutput`] with the volumes, their affines and region names (or a tuple of those).
        """
        arguments = dict(locals())
        del arguments["self"]
        return self._generate(**arguments)

    def _predict_noise(self, sample, timestep, class_labels, control=None) -> torch.Tensor:
        """The denoiser's noise prediction (the ControlNet pipeline adds its residuals here)."""
        return self.unet(sample, timestep, class_labels=class_labels).sample

    def _generate(
        self,
        region,
        num_inference_steps,
        generator,
        num_volumes_per_region,
        volume_size,
        latents,
        output_type,
        return_dict,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
        control=None,
    ):
        """The generation loop behind `__call__`; `control` carries the ControlNet pipeline's inputs."""
        if isinstance(callback_on_step_end, PipelineCallback | MultiPipelineCallbacks):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        requested = region if isinstance(region, list | tuple) else [region]
        if not requested or num_volumes_per_region < 1:
            raise ValueError("Ask for at least one region and one volume per region.")
        regions = [self.get_region(name) for name in requested for _ in range(num_volumes_per_region)]
        self.check_inputs(regions, volume_size, latents, output_type, callback_on_step_end_tensor_inputs)
        volume_size = tuple(volume_size) if volume_size is not None else tuple(regions[0].volume_size)
        latent_size = self._latent_size(volume_size)
        if latents is not None and latents.shape[0] != len(regions):
            raise ValueError(f"`latents` has batch {latents.shape[0]} but {len(regions)} volumes were requested.")

        device = self._execution_device
        class_labels = torch.tensor([r.class_id for r in regions], device=device, dtype=torch.long)
        latents = self.prepare_latents(len(regions), latent_size, self.unet.dtype, device, generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = latents
                if hasattr(self.scheduler, "scale_model_input"):
                    model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self._predict_noise(model_input, t, class_labels, control)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in callback_on_step_end_tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        spacings = [r.spacing_for(volume_size) for r in regions]
        if output_type == "latent":
            volumes = latents
            factor = self.vqvae_factor
            spacings = [tuple(s * factor for s in spacing) for spacing in spacings]
        else:
            volumes = self.decode_latents(latents).float().cpu()
        affines = np.stack([affine_from_tensor_spacing(spacing) for spacing in spacings])
        names = [r.name for r in regions]
        if output_type == "np":
            volumes = volumes.float().cpu().numpy()
        elif output_type == "nifti":
            volumes = [
                nib.Nifti1Image(tensor_to_nifti_array(volume[None]).astype(np.float32), affine)
                for volume, affine in zip(volumes, affines)
            ]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (volumes, affines, names)
        return MedDiffusionPipelineOutput(volumes=volumes, affines=affines, regions=names)
