"""`MedDiffusionPipeline`: class-conditional 3D latent diffusion (3D MedDiffusion, Wang et al., IEEE TMI 2025)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ...io.nifti import affine_from_tensor_spacing
from ...io.regions import Region, RegionRegistry, meddiffusion_regions
from ...models import VQModel3D
from ..pipeline_utils_3d import (
    LARGE_DECODE_LATENT_VOXELS,
    VolumePipeline,
    decode_normalized_latents,
    scale_model_input,
)
from .pipeline_output import MedDiffusionPipelineOutput


class MedDiffusionPipeline(VolumePipeline):
    r"""Generate CT and MRI volumes of a chosen region with 3D MedDiffusion.

    The denoiser works on the normalised latent space of a Patch-Volume autoencoder; the sample is denormalised to
    the codebook's range and decoded by the autoencoder's joint decoder: whole up to `tiled_decode_threshold` latent
    voxels, above it exactly in bounded memory with [`~VQModel3D.enable_slab_decoding`]'s settings, unless the
    autoencoder has blended tiling ([`~VQModel3D.enable_tiling`], faster, approximate) or slab decoding enabled.

    Components:
        vqvae ([`VQModel3D`]): Patch-Volume autoencoder.
        unet ([`BiFlowNet3DModel`]): Class-conditional noise estimator.
        scheduler ([`SchedulerMixin`]): Any diffusers scheduler; build it with
            `X.from_config(pipe.scheduler.config)` so it gets the schedule and the settings it needs.
            [`MedDiffusionDDIMScheduler`] reproduces the original DDIM sampler.

    Configuration (saved in `model_index.json`):
        regions (`list[dict]`): The model's classes, their aliases, default sizes and spacings (see
            [`~io.regions.RegionRegistry`]). Defaults to the seven classes of the released model.
        tiled_decode_threshold (`int`): Latents with more voxels than this (16³ by default: volumes above 128³ with
            the 8x autoencoder, whose full decode needs about 3 GB at 128³ and 28 GB at 256³) are decoded slab by slab
            (exact, bounded memory) unless the autoencoder's decode mode was chosen explicitly.
    """

    model_cpu_offload_seq = "unet->vqvae"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vqvae: VQModel3D,
        unet,
        scheduler,
        regions: list[dict] | None = None,
        tiled_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS,
    ):
        super().__init__()
        self.register_modules(vqvae=vqvae, unet=unet, scheduler=scheduler)
        registry = RegionRegistry(regions) if regions is not None else meddiffusion_regions()
        self.register_to_config(regions=registry.to_config(), tiled_decode_threshold=tiled_decode_threshold)
        self.region_registry = registry

    @property
    def vqvae_factor(self) -> int:
        """Voxels per latent voxel along each axis."""
        return self.vqvae.downsample_factor

    def get_region(self, region: str | int) -> Region:
        """Resolve a region name, alias or class id; unknown names raise a `ValueError` listing the valid ones."""
        return self.region_registry.resolve(region)

    def resolve_regions(self, region, num_volumes_per_region: int) -> list[Region]:
        """One [`Region`] per generated volume: each requested region, `num_volumes_per_region` times."""
        requested = list(region) if isinstance(region, list | tuple) else [region]
        if not requested or num_volumes_per_region < 1:
            raise ValueError("Ask for at least one region and one volume per region.")
        return [self.get_region(name) for name in requested for _ in range(num_volumes_per_region)]

    def latent_size(self, volume_size) -> tuple[int, int, int]:
        """Latent size of a `(D, H, W)` volume; raises a `ValueError` for sides the models cannot take."""
        factor = self.vqvae_factor
        multiple = getattr(self.unet, "latent_size_multiple", 8)
        sizes = tuple(int(side) for side in volume_size)
        if len(sizes) != 3 or any(side <= 0 or side % (factor * multiple) for side in sizes):
            raise ValueError(
                f"`volume_size` must be three positive sides (D, H, W) divisible by {factor * multiple} (autoencoder "
                f"factor {factor} x denoiser multiple {multiple}); got {volume_size!r}."
            )
        return tuple(side // factor for side in sizes)

    def default_volume_size(self, regions: list[Region]) -> tuple[int, int, int]:
        """The requested regions' common trained size (a `ValueError` when they have none or differ)."""
        missing = [region.name for region in regions if region.volume_size is None]
        if missing:
            raise ValueError(f"Regions {missing} have no default size; pass `volume_size=(D, H, W)`.")
        sizes = {tuple(region.volume_size) for region in regions}
        if len(sizes) > 1:
            raise ValueError(
                f"The requested regions have different default sizes {sorted(sizes)}; pass `volume_size` or "
                "generate them in separate calls."
            )
        return sizes.pop()

    def class_labels(self, regions: list[Region], device) -> torch.Tensor:
        """Class ids of the volumes, for the denoiser."""
        return torch.tensor([region.class_id for region in regions], device=device, dtype=torch.long)

    def region_affines(self, regions: list[Region], volume_size, output_type: str) -> np.ndarray:
        """`(B, 4, 4)` affines from each region's spacing (latent voxels are `vqvae_factor` times larger)."""
        spacings = [region.spacing_for(volume_size) for region in regions]
        if output_type == "latent":
            spacings = [tuple(side * self.vqvae_factor for side in spacing) for spacing in spacings]
        return np.stack([affine_from_tensor_spacing(spacing) for spacing in spacings])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents → volumes: denormalise to the codebook range, quantise, decode (exactly slab by
        slab above `tiled_decode_threshold` latent voxels, `vqvae.enable_tiling()` for blended tiles)."""
        return decode_normalized_latents(self.vqvae, latents, self.config.tiled_decode_threshold)

    def package_output(self, latents, regions: list[Region], volume_size, output_type: str, return_dict: bool):
        """Decode the final latents (unless `output_type="latent"`) and return them with affines and region names."""
        volumes = latents if output_type == "latent" else self.decode_latents(latents).float().cpu()
        affines = self.region_affines(regions, volume_size, output_type)
        names = [region.name for region in regions]
        return self.finish(volumes, affines, names, output_type, return_dict, MedDiffusionPipelineOutput)

    @torch.no_grad()
    def __call__(
        self,
        region: str | int | list[str | int] = "MRBrainT1",
        num_inference_steps: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_volumes_per_region: int = 1,
        volume_size: tuple[int, int, int] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> MedDiffusionPipelineOutput | tuple:
        r"""Generate volumes.

        Args:
            region: Region name, alias or class id (or a list of them), e.g. `"MRBrain"` or `0`; see
                `pipe.config.regions` or `meddiffusers regions --model ...` for a model's regions.
            num_inference_steps: Denoising steps.
            generator: One `torch.Generator` or one per volume, for reproducible noise.
            num_volumes_per_region: Volumes generated for each requested region.
            volume_size: Output size `(D, H, W)` in voxels; defaults to the region's trained size. Each side must
                be divisible by the autoencoder factor times the denoiser's latent multiple.
            latents: Initial noise of shape `(B, C, d, h, w)` instead of sampling it (unscaled: the pipeline
                multiplies it by the scheduler's `init_noise_sigma`).
            eta: DDIM stochasticity, passed to schedulers whose `step` takes it (0: deterministic DDIM, 1: the
                original stochastic sampler).
            output_type: `"np"`, `"pt"`, `"latent"` (normalised latents, no decoding) or `"nifti"` (a list of
                `nibabel.Nifti1Image` with each region's spacing).
            return_dict: Return a [`MedDiffusionPipelineOutput`] rather than a tuple.
            callback_on_step_end: Called after every step as `callback(pipe, step, timestep, kwargs)`; may return a
                dict replacing any of `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback (`["latents"]`).

        Returns:
            [`MedDiffusionPipelineOutput`] with the volumes, their affines and region names (or a tuple of those).
        """
        # 1. Check the request before any model runs.
        regions = self.resolve_regions(region, num_volumes_per_region)
        self.check_output_type(output_type)
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        volume_size = tuple(volume_size) if volume_size is not None else self.default_volume_size(regions)
        latent_shape = (len(regions), self.unet.config.in_channels, *self.latent_size(volume_size))
        device = self._execution_device
        class_labels = self.class_labels(regions, device)

        # 2. Timesteps first: the initial noise scale of Euler-type schedulers depends on them.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.warn_if_unbounded_start(timesteps)
        latents = self.prepare_noise(latent_shape, generator, device, self.unet.dtype, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. Denoise.
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = scale_model_input(self.scheduler, latents, t)
                noise_pred = self.unet(model_input, t, class_labels=class_labels).sample
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    callback_kwargs = {}
                    for name in tensor_inputs:
                        callback_kwargs[name] = locals()[name]
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 4. Decode and package with each region's geometry.
        return self.package_output(latents, regions, volume_size, output_type, return_dict)
