"""`MedDiffusionControlNetPipeline`: 3D MedDiffusion generation guided by a condition volume through a ControlNet."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ...io.nifti import NiftiVolume
from ...models import ControlNet3DModel, VQModel3D
from ..pipeline_utils_3d import LARGE_DECODE_LATENT_VOXELS, scale_model_input
from .pipeline_meddiffusion import MedDiffusionPipeline
from .pipeline_output import MedDiffusionPipelineOutput


class MedDiffusionControlNetPipeline(MedDiffusionPipeline):
    r"""Conditional generation with a [`ControlNet3DModel`] on top of a [`MedDiffusionPipeline`]'s models.

    The condition (a sparse-view CT reconstruction, a zero-filled MRI reconstruction, a mask, ...) is given in image
    space, `(B, 1, D, H, W)` in `[-1, 1]` (or a [`NiftiVolume`]), and is encoded by the autoencoder with the
    diffusion latents' normalisation; or directly in latent space, `(B, conditioning_channels, d, h, w)`. The output
    size is the condition's.

    Components: `vqvae`, `unet`, `controlnet`, `scheduler` (any diffusers scheduler); configuration as
    [`MedDiffusionPipeline`].

    The denoising loop is [`MedDiffusionPipeline`]'s with the ControlNet's residuals added at every step; the
    region, size and output helpers are inherited.
    """

    model_cpu_offload_seq = "controlnet->unet->vqvae"

    def __init__(
        self,
        vqvae: VQModel3D,
        unet,
        controlnet: ControlNet3DModel,
        scheduler,
        regions: list[dict] | None = None,
        tiled_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS,
    ):
        super().__init__(vqvae, unet, scheduler, regions, tiled_decode_threshold)
        self.register_modules(controlnet=controlnet)

    def prepare_condition(self, condition, regions, batch_size: int) -> torch.Tensor:
        """The condition as normalised latents `(B, conditioning_channels, d, h, w)`, checked for shape and spacing."""
        channels = self.controlnet.config.conditioning_channels
        if isinstance(condition, NiftiVolume):
            for region in regions:
                expected = region.spacing_for(tuple(condition.tensor.shape[2:]))
                if not np.allclose(condition.spacing, expected, atol=1e-3):
                    raise ValueError(
                        f"The condition's spacing {condition.spacing} (D, H, W) differs from the {region.name} "
                        f"model's {tuple(expected)} mm; resample it first."
                    )
            condition = condition.tensor
        if not isinstance(condition, torch.Tensor) or condition.ndim != 5:
            raise ValueError("`condition` must be a (B, C, D, H, W) tensor or a NiftiVolume.")
        if not torch.isfinite(condition).all():
            raise ValueError("`condition` contains NaN or infinite values.")
        device, dtype = self._execution_device, self.unet.dtype
        image_channels = self.vqvae.config.in_channels
        if condition.shape[1] == image_channels and channels == self.vqvae.config.latent_channels:
            with torch.no_grad():
                encoded = self.vqvae.encode(condition.to(device, self.vqvae.dtype))
            if tuple(encoded.input_size) != tuple(s * self.vqvae_factor for s in encoded.latents.shape[2:]):
                raise ValueError(
                    f"Condition sides {tuple(condition.shape[2:])} must be multiples of the autoencoder patch size "
                    f"{self.vqvae.patch_size}."
                )
            latents = self.vqvae.normalize_latents(encoded.latents)
        elif condition.shape[1] == channels:
            latents = condition
        else:
            raise ValueError(
                f"`condition` has {condition.shape[1]} channels; give an image-space volume ({image_channels} "
                f"channel) or a latent-space condition ({channels} channels)."
            )
        if latents.shape[0] == 1 and batch_size > 1:
            latents = latents.expand(batch_size, *latents.shape[1:])
        if latents.shape[0] != batch_size:
            raise ValueError(f"`condition` has batch {latents.shape[0]} but {batch_size} volumes were requested.")
        return latents.to(device, dtype)

    @torch.no_grad()
    def __call__(
        self,
        region: str | int | list[str | int] = "MRBrainT1",
        condition: torch.Tensor | NiftiVolume | None = None,
        controlnet_conditioning_scale: float = 1.0,
        num_inference_steps: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_volumes_per_region: int = 1,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MedDiffusionPipelineOutput | tuple:
        r"""Generate volumes guided by `condition`.

        Args:
            region: Region name, alias or class id (or a list).
            condition: Image-space `(B or 1, 1, D, H, W)` volume in `[-1, 1]` (or a `NiftiVolume`, whose spacing must
                match the region's), or a latent-space `(B or 1, conditioning_channels, d, h, w)` condition. The
                output size is the condition's.
            controlnet_conditioning_scale: Multiplies the ControlNet residuals (0 gives the unconditional model).
            Other arguments: as [`MedDiffusionPipeline.__call__`].
        """
        # 1. Check the request and encode the condition before sampling.
        if condition is None:
            raise ValueError("`condition` is required; use MedDiffusionPipeline for unconditional generation.")
        regions = self.resolve_regions(region, num_volumes_per_region)
        self.check_output_type(output_type)
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        control_latents = self.prepare_condition(condition, regions, len(regions))
        volume_size = tuple(side * self.vqvae_factor for side in control_latents.shape[2:])
        latent_shape = (len(regions), self.unet.config.in_channels, *self.latent_size(volume_size))
        device = self._execution_device
        class_labels = self.class_labels(regions, device)

        # 2. Timesteps, then the initial noise.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.warn_if_unbounded_start(timesteps)
        latents = self.prepare_noise(latent_shape, generator, device, self.unet.dtype, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. Denoise: the ControlNet's residuals join the denoiser's skips and middle block at every step.
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = scale_model_input(self.scheduler, latents, t)
                residuals = self.controlnet(
                    model_input,
                    t,
                    class_labels=class_labels,
                    controlnet_cond=control_latents,
                    conditioning_scale=controlnet_conditioning_scale,
                )
                noise_pred = self.unet(
                    model_input,
                    t,
                    class_labels=class_labels,
                    down_block_additional_residuals=residuals.down_block_res_samples,
                    mid_block_additional_residual=residuals.mid_block_res_sample,
                ).sample
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 4. Decode and package.
        return self.package_output(latents, regions, volume_size, output_type, return_dict)
