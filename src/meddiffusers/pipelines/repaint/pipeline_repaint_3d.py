"""`RePaint3DPipeline`: inpainting of 3D volumes with an unconditional diffusion prior, exactly as RePaint samples.

RePaint (Lugmayr et al., CVPR 2022; andreas128/RePaint@8e2a055) walks a jump schedule of the respaced time
indices. On each reverse step it draws the sampling noise, replaces the known region of the network input by the
image noised to that step with a fresh draw, and takes a DDPM posterior step from the clipped `x0`; on each undo it
noises the sample back up one step. See `algorithms.md` §4 and `docs/source/en/api/pipelines/repaint_3d.md`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ...io.intensity import HUWindow
from ...io.nifti import affine_from_tensor_spacing
from ...io.regions import Region, RegionRegistry, meddiff_fm_regions, meddiffusion_regions
from ...models import BiFlowNet3DModel, PatchUNet3DModel, VQModel3D
from ...schedulers.jump_schedule import check_jump_schedule, repaint_jump_schedule
from ...schedulers.scheduling_repaint_ddpm import RePaintDDPMScheduler
from ...utils.sliding_window import BLEND_MODES, window_locations
from ...utils.validation import as_triple, check_volume_tensor
from ..meddiff_fm.pipeline_patch_sliding_window import predict_windowed_noise
from ..pipeline_utils_3d import (
    LARGE_DECODE_LATENT_VOXELS,
    VolumePipeline,
    VolumePipelineOutput,
    decode_normalized_latents,
    thresholding_without_quantiles,
)
from .anatomy import prepare_anatomy

logger = logging.get_logger(__name__)


def as_volume_batch(value, name: str) -> torch.Tensor:
    """A `(B, C, D, H, W)` float tensor from a `(D, H, W)`, `(C, D, H, W)` or batched tensor or array."""
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype == torch.bool or not tensor.is_floating_point():
        tensor = tensor.float()
    while tensor.ndim < 5:
        tensor = tensor[None]
    check_volume_tensor(tensor, name)
    return tensor


class RePaint3DPipeline(VolumePipeline):
    r"""Inpaint the unknown region of 3D volumes with RePaint's resampling, in image or latent space.

    The known region (`mask_image == 1`) is re-injected at the network input of every reverse step, noised to that
    step with a fresh draw; the rest is sampled by the prior. The sampler reproduces the original
    (andreas128/RePaint@8e2a055) to float32 rounding; diffusers' deprecated `RePaintScheduler` does not (see the docs).

    Three kinds of prior:

    - any model called as `unet(sample, t)` (a `(B, C, ...)` noise prediction, or `2C` channels with a learned-range
      variance), on volumes of any channel count;
    - a MedDiff-FM [`PatchUNet3DModel`]: its noise estimate over overlapping windows ([`predict_windowed_noise`]),
      with a region's class id;
    - with a `vqvae`, 3D MedDiffusion's latent space ([`VQModel3D`] + [`BiFlowNet3DModel`]): the known latent is the
      encoded image, the mask is taken to latent resolution (a latent voxel is known only when its whole footprint
      is) and the decoded result is composited with the image in image space.

    Components:
        unet: The noise predictor, called with the original (1000-step) integer timesteps.
        scheduler ([`RePaintDDPMScheduler`]): RePaint's respaced DDPM step. A `DDPMScheduler` is converted to one
            with the same settings (adding float64 tables and the caller's noise). RePaint's respacing needs
            `timestep_spacing="linspace"`.
        vqvae ([`VQModel3D`], optional): For latent-space priors.

    Configuration (saved in `model_index.json`):
        regions (`list[dict]`, optional): Region names, class ids, spacings and HU windows; MedDiff-FM's for a
            [`PatchUNet3DModel`], MedDiffusion's with a `vqvae`, none otherwise.
        window_size (`int` or three ints): Window of a [`PatchUNet3DModel`] when a call gives none.
        tiled_decode_threshold (`int`): Latents with more voxels are decoded exactly slab by slab (bounded memory).
    """

    model_cpu_offload_seq = "vqvae->unet"
    _optional_components = ["vqvae"]
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(
        self,
        unet: PatchUNet3DModel | BiFlowNet3DModel | ModelMixin,
        scheduler: RePaintDDPMScheduler | DDPMScheduler,
        vqvae: VQModel3D | None = None,
        regions: list[dict] | None = None,
        window_size: int | Sequence[int] = 128,
        tiled_decode_threshold: int = LARGE_DECODE_LATENT_VOXELS,
    ):
        super().__init__()
        if not isinstance(scheduler, DDPMScheduler):
            raise ValueError(
                f"RePaint3DPipeline takes a DDPM scheduler, got {type(scheduler).__name__}; build one with "
                "`RePaintDDPMScheduler.from_config(scheduler.config)`."
            )
        if not isinstance(scheduler, RePaintDDPMScheduler):
            # Every setting as it is, defaults included (`from_config` would give unset ones RePaint's defaults).
            settings = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
            scheduler = RePaintDDPMScheduler.from_config(settings)
        self.register_modules(unet=unet, scheduler=scheduler, vqvae=vqvae)
        if regions is not None:
            registry = RegionRegistry(regions)
        elif isinstance(unet, PatchUNet3DModel):
            registry = meddiff_fm_regions()
        elif vqvae is not None:
            registry = meddiffusion_regions()
        else:
            registry = None
        window_size = window_size if isinstance(window_size, int) else list(as_triple(tuple(window_size), "window"))
        self.register_to_config(
            regions=registry.to_config() if registry is not None else None,
            window_size=window_size,
            tiled_decode_threshold=tiled_decode_threshold,
        )
        self.region_registry = registry

    # ------------------------------------------------------------------------------------------------ requests

    def get_region(self, region: str | int | Region) -> Region:
        """Resolve a region name, alias or class id; unknown names raise a `ValueError` listing the valid ones."""
        if self.region_registry is None:
            raise ValueError("This pipeline has no `regions`; build it with `regions=[...]` or pass `class_labels`.")
        return self.region_registry.resolve(region)

    def hu_window(self, region: str | int | Region) -> HUWindow:
        """The region's HU window (HU ↔ `[-1, 1]`), to bring a CT into model space and back."""
        return self.get_region(region).hu_window()

    def latent_mask(self, mask_image: torch.Tensor) -> torch.Tensor:
        """The keep-mask at latent resolution: a latent voxel is known only when all the voxels it encodes are."""
        factor = self.vqvae.downsample_factor
        unknown = F.max_pool3d(1 - mask_image.amax(1, keepdim=True).float(), kernel_size=factor, stride=factor)
        return 1 - unknown

    def check_inputs(
        self, image, mask_image, num_inference_steps, jump_schedule, output_type, latents, class_labels, windowing
    ) -> None:
        """Raise a `ValueError` naming the argument for any request the sampler cannot run, before any model runs."""
        self.check_output_type(output_type)
        if image.min() < -1.001 or image.max() > 1.001:
            raise ValueError(
                f"`image` must be in model space [-1, 1], got [{float(image.min()):.3g}, {float(image.max()):.3g}]; "
                "map a CT with `pipe.hu_window(region)(hu)` first."
            )
        if mask_image.shape[0] not in (1, image.shape[0]) or mask_image.shape[1] not in (1, image.shape[1]):
            raise ValueError(
                f"`mask_image` has shape {tuple(mask_image.shape)}; it must broadcast to `image` "
                f"{tuple(image.shape)} (1 or B volumes, 1 or C channels)."
            )
        if mask_image.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"`mask_image` covers {tuple(mask_image.shape[2:])} voxels but `image` {tuple(image.shape[2:])}."
            )
        if not ((mask_image == 0) | (mask_image == 1)).all():
            raise ValueError("`mask_image` must hold only 0 (inpaint) and 1 (keep).")
        if bool((mask_image == 1).all()):
            logger.warning("`mask_image` keeps every voxel: there is nothing to inpaint.")
        train_steps = self.scheduler.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= train_steps:
            raise ValueError(
                f"`num_inference_steps` must be an int in [1, {train_steps}], got {num_inference_steps!r}."
            )
        check_jump_schedule(jump_schedule, num_inference_steps)
        if latents is not None:
            check_volume_tensor(latents, "latents")
        if self.vqvae is not None:
            factor = self.vqvae.downsample_factor * getattr(self.unet, "latent_size_multiple", 1)
            patch = self.vqvae.patch_size
            if any(side % factor or side % cube for side, cube in zip(image.shape[2:], patch)):
                raise ValueError(
                    f"`image` sides {tuple(image.shape[2:])} must be multiples of {factor} (autoencoder factor x "
                    f"denoiser multiple) and of the autoencoder's patch {patch} for latent-space inpainting; pad "
                    "the volume."
                )
        if isinstance(self.unet, PatchUNet3DModel):
            if self.unet.class_embedding is not None and class_labels is None:
                raise ValueError("This PatchUNet3DModel is region-conditional: pass `region=` (or `class_labels=`).")
            if windowing["blend"] not in BLEND_MODES:
                raise ValueError(f"`blend` must be one of {BLEND_MODES}, got {windowing['blend']!r}.")
            volume_size = tuple(image.shape[2:])
            window = tuple(min(w, s) for w, s in zip(as_triple(windowing["window_size"], "window_size"), volume_size))
            if any(side % self.unet.size_multiple for side in (*volume_size, *window)):
                raise ValueError(
                    f"`image` sides {volume_size} and the window {window} must be multiples of "
                    f"{self.unet.size_multiple} (the denoiser's downsampling factor); pad the volume."
                )
            window_locations(volume_size, window, windowing["overlap"])  # validates `overlap`

    def resolve_class_labels(self, region, class_labels, batch: int, device) -> tuple[torch.Tensor | None, list]:
        """`(B,)` class ids from `region` (a name, id, or one per volume) or `class_labels`, and the regions."""
        if region is not None and class_labels is not None:
            raise ValueError("Pass either `region` or `class_labels`, not both.")
        if region is None:
            if class_labels is None:
                return None, []
            labels = torch.as_tensor(class_labels, device=device).long().reshape(-1)
            return labels.expand(batch) if labels.numel() == 1 else labels, []
        names = list(region) if isinstance(region, list | tuple) else [region] * batch
        if len(names) != batch:
            raise ValueError(f"Got {len(names)} regions for {batch} volumes.")
        regions = [self.get_region(name) for name in names]
        return torch.tensor([item.class_id for item in regions], device=device), regions

    # ------------------------------------------------------------------------------------------------ model

    def predict_noise(self, sample, timestep, class_labels, windowing: dict, anatomy=None) -> torch.Tensor:
        """The prior's output at one timestep: windowed for a [`PatchUNet3DModel`] (each window with its crop of
        `anatomy`, `(B, 1, D, H, W)` labels, when given), else `unet(sample, t)`."""
        if isinstance(self.unet, PatchUNet3DModel):
            if class_labels is None:
                class_labels = torch.zeros(len(sample), dtype=torch.long, device=sample.device)
            return predict_windowed_noise(self.unet, sample, timestep, class_labels, anatomy=anatomy, **windowing)
        extra = {} if class_labels is None else {"class_labels": class_labels}
        output = self.unet(sample, timestep, **extra)
        if isinstance(output, torch.Tensor):
            return output
        return output.sample if hasattr(output, "sample") else output[0]

    def split_variance(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model output the scheduler takes: `2C` channels for a learned-range variance, else the noise half."""
        channels = sample.shape[1]
        if self.scheduler.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * channels:
                raise ValueError(
                    f"A 'learned_range' variance needs {2 * channels} model output channels (noise, variance); got "
                    f"{model_output.shape[1]}. Use a scheduler with variance_type='fixed_small'."
                )
            return model_output
        if model_output.shape[1] == 2 * channels:
            return model_output[:, :channels]
        return model_output

    # ------------------------------------------------------------------------------------------------ outputs

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised diffusion latents → volumes (denormalise, quantise, decode; exact slabs above the threshold)."""
        return decode_normalized_latents(self.vqvae, latents, self.config.tiled_decode_threshold)

    def output_affines(self, regions: list[Region], affine, batch: int, output_type: str) -> np.ndarray:
        """`(B, 4, 4)` affines: the given one(s), else each region's spacing, else 1 mm voxels."""
        if affine is not None:
            affines = np.asarray(affine, dtype=np.float64).reshape(-1, 4, 4)
            return np.broadcast_to(affines, (batch, 4, 4)).copy()
        spacings = [region.spacing for region in regions] or [(1.0, 1.0, 1.0)] * batch
        if output_type == "latent" and self.vqvae is not None:
            spacings = [tuple(side * self.vqvae.downsample_factor for side in spacing) for spacing in spacings]
        return np.stack([affine_from_tensor_spacing(spacing) for spacing in spacings])

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor | np.ndarray,
        mask_image: torch.Tensor | np.ndarray,
        num_inference_steps: int = 250,
        jump_length: int = 10,
        jump_n_sample: int = 10,
        jump_schedule: Sequence[int] | None = None,
        composite_known: bool = True,
        region: str | int | list[str | int] | None = None,
        class_labels: torch.Tensor | None = None,
        window_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "constant",
        window_batch_size: int = 1,
        anatomy: torch.Tensor | np.ndarray | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        affine: np.ndarray | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VolumePipelineOutput | tuple:
        r"""Inpaint `image` where `mask_image` is 0.

        Args:
            image: `(B, C, D, H, W)` (or `(D, H, W)`, `(C, D, H, W)`) in model space `[-1, 1]`; map a CT with
                `pipe.hu_window(region)(hu)`. Its values under the unknown region are ignored.
            mask_image: Same spatial size; 1 = keep (known), 0 = inpaint, as in diffusers. 1 or B volumes, 1 or C
                channels.
            num_inference_steps: Respaced steps of the 1000-step schedule (RePaint's `timestep_respacing`, 250 in the
                paper); the network gets the original timesteps.
            jump_length: Steps of each jump back up (10 in the paper).
            jump_n_sample: Times each segment is sampled (10 in the paper; 1 = no resampling).
            jump_schedule: A schedule from [`repaint_jump_schedule`] with its other resampling options (`n_sample`,
                `jump2_*`, `jump3_*`, `start_resampling`); replaces `jump_length` and `jump_n_sample`.
            composite_known: Put the known voxels of `image` into the result (in image space). `False` returns the
                original's output, whose known region is the model's reconstruction.
            region: Region name, alias or class id (or one per volume) for region-conditional priors; also gives the
                HU window of `"nifti"` outputs and the output spacing.
            class_labels: `(B,)` class ids instead of `region`.
            window_size / overlap / blend / window_batch_size: Windowing of a [`PatchUNet3DModel`] prior (see
                [`predict_windowed_noise`]); `window_size` defaults to the pipeline's.
            anatomy: Integer anatomy labels over the whole volume, `(D, H, W)` or `(1 or B, 1, D, H, W)` (0
                background), for a [`PatchUNet3DModel`] built with an `anatomy_encoding`: every network call gets
                each window's crop of it, as [`PatchSlidingWindowPipeline`] samples.
            latents: Initial noise `x_T` of the model-space shape instead of drawing it.
            generator: One `torch.Generator` or one per volume. Every draw is one `randn_tensor` call of the
                model-space shape: `x_T`, then per reverse step the sampling noise and (after the first) the known
                region's noise, and per undo one draw.
            affine: `(4, 4)` or `(B, 4, 4)` voxel-to-world matrices of the output (tensor axes); defaults to the
                region's spacing, else 1 mm.
            output_type: `"np"`, `"pt"` (model space, clipped to `[-1, 1]`), `"nifti"` (HU with a region's window,
                else model space) or `"latent"` (the sampler's final state in model space, unclipped and not
                composited; latents for a latent-space prior).
            return_dict: Return a [`VolumePipelineOutput`] rather than a tuple.
            callback_on_step_end: Called after every move (reverse step or undo) as
                `callback(pipe, move, timestep, kwargs)`; may return a replacement `latents`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback (`latents`, `pred_original_sample`).

        Returns:
            [`VolumePipelineOutput`] with the volumes, their affines and region names (or a tuple of those).
        """
        # 1. Check the request before any model runs.
        device = self._execution_device
        image = as_volume_batch(image, "image").to(device)
        mask_image = as_volume_batch(mask_image, "mask_image").to(device)
        batch = image.shape[0]
        if jump_schedule is None:
            jump_schedule = repaint_jump_schedule(num_inference_steps, jump_length, jump_n_sample)
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        class_labels, regions = self.resolve_class_labels(region, class_labels, batch, device)
        window_size = self.config.window_size if window_size is None else window_size
        windowing = dict(window_size=window_size, overlap=overlap, blend=blend, window_batch_size=window_batch_size)
        self.check_inputs(
            image, mask_image, num_inference_steps, jump_schedule, output_type, latents, class_labels, windowing
        )
        self.check_generators(generator, batch)
        anatomy = prepare_anatomy(self.unet, anatomy, batch, image.shape[2:], device)
        dtype = self.unet.dtype

        # 2. The known region in model space: the image itself, or its latents with the mask at latent resolution.
        mask_image = mask_image.expand(batch, *mask_image.shape[1:]).to(dtype)
        if self.vqvae is not None:
            known = self.vqvae.normalize_latents(self.vqvae.encode(image.to(self.vqvae.dtype)).latents).to(dtype)
            keep = self.latent_mask(mask_image)
        else:
            known, keep = image.to(dtype), mask_image

        # 3. The respaced timesteps (original 1000-step values, indexed by the respaced index) and x_T.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timestep_of_index = self.scheduler.timesteps.flip(0)
        moves = list(zip(jump_schedule[:-1], jump_schedule[1:]))
        shape = tuple(known.shape)
        if latents is None:  # drawn here, like every other draw of the sampler
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        latents = self.prepare_noise(shape, generator, device, dtype, latents)
        pred_original_sample = None

        # 4. Walk the jump schedule.
        self._num_timesteps = len(moves)
        self._interrupt = False
        with self.progress_bar(total=len(moves)) as progress_bar, thresholding_without_quantiles(self.scheduler):
            for move, (index, next_index) in enumerate(moves):
                if self.interrupt:
                    break
                if next_index < index:
                    # Reverse step at `index`: the sampling noise first, then the known region at the input.
                    t = timestep_of_index[index]
                    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                    if pred_original_sample is not None:
                        known_noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                        noisy_known = self.scheduler.add_noise(known, known_noise, t.reshape(1))
                        latents = keep * noisy_known + (1 - keep) * latents
                    model_output = self.predict_noise(latents, t, class_labels, windowing, anatomy)
                    model_output = self.split_variance(model_output, latents)
                    output = self.scheduler.step(model_output, t, latents, variance_noise=noise)
                    latents, pred_original_sample = output.prev_sample, output.pred_original_sample
                else:
                    # Undo: noise the sample back up one respaced step.
                    t = timestep_of_index[next_index]
                    noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
                    latents = self.scheduler.undo_step(latents, t, noise)
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "pred_original_sample": pred_original_sample}
                    callback_kwargs = {name: tensors[name] for name in tensor_inputs}
                    callback_outputs = callback_on_step_end(self, move, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 5. To image space, put the known voxels back, and package with the geometry.
        affines = self.output_affines(regions, affine, batch, output_type)
        if output_type == "latent":
            volumes = latents
        else:
            volumes = self.decode_latents(latents) if self.vqvae is not None else latents
            volumes = volumes.float().clamp(-1, 1)
            if composite_known:
                volumes = mask_image * image + (1 - mask_image) * volumes
            volumes = volumes.cpu()
            if output_type == "nifti" and regions and all(item.intensity_window for item in regions):
                volumes = torch.cat([item.hu_window().inverse(v[None]) for item, v in zip(regions, volumes)])
        volumes = self.postprocess(volumes, affines, output_type)
        names = [item.name for item in regions] or None
        self.maybe_free_model_hooks()
        if not return_dict:
            return (volumes, affines, names)
        return VolumePipelineOutput(volumes=volumes, affines=affines, regions=names)
