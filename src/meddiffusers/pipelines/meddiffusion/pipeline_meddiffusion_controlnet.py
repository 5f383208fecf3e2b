"""`MedDiffusionControlNetPipeline`: 3D MedDiffusion generation guided by a condition volume through a ControlNet."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ...io.nifti import NiftiVolume
from ...models.autoencoders.vq_model_3d import VQModel3D
from ...models.controlnet_3d import ControlNet3DModel
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
    """

    model_cpu_offload_seq = "controlnet->unet->vqvae"

    def __init__(
        self,
        vqvae: VQModel3D,
        unet,
        controlnet: ControlNet3DModel,
        scheduler,
        regions: list[dict] | None = None,
        tiled_decode_threshold: int = 32**3,
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

    def _predict_noise(self, sample, timestep, class_labels, control=None) -> torch.Tensor:
        residuals = self.controlnet(
            sample,
            timestep,
            class_labels=class_labels,
            controlnet_cond=control["latents"],
            conditioning_scale=control["scale"],
        )
        return self.unet(
            sample,
            timestep,
            class_labels=class_labels,
            down_block_additional_residuals=residuals.down_block_res_samples,
            mid_block_additional_residual=residuals.mid_block_res_sample,
        ).sample

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
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MedDiffusionPipelineOutput | tuple:
        r"""Generate volumes guided by `condition`.

        Args:
            region: Region name, alias or class id (or a list).
            condition: Image-space `(B or 1, 1, D, H, W)` volume in `[-1, 1]` (or a `NiftiVolume`, whose spacing must
                match the region's), or a latent-space `(B or 1, conditioning_channels, d, h, w)` condition.
            controlnet_conditioning_scale: Multiplies the ControlNet residuals (0 gives the unconditional model).
            Other arguments: as [`MedDiffusionPipeline.__call__`]; the volume size is the condition's.
        """
        arguments = dict(locals())
        for name in ("self", "condition", "controlnet_conditioning_scale"):
            del arguments[name]
        if condition is None:
            raise ValueError("`condition` is required; use MedDiffusionPipeline for unconditional generation.")
        requested = region if isinstance(region, list | tuple) else [region]
        regions = [self.get_region(name) for name in requested for _ in range(num_volumes_per_region)]
        control_latents = self.prepare_condition(condition, regions, len(regions))
        arguments["volume_size"] = tuple(side * self.vqvae_factor for side in control_latents.shape[2:])
        control = {"latents": control_latents, "scale": controlnet_conditioning_scale}
        return self._generate(**arguments, control=control)
