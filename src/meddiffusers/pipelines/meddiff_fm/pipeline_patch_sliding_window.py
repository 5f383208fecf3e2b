"""`PatchSlidingWindowPipeline`: MedDiff-FM sampling of CT volumes of any size with overlapping windows.

At every reverse step the noise of each window is predicted with the window's global coordinates and its crop of
the conditions; the predictions are blended with per-voxel weights into one noise estimate of the whole volume, and
one scheduler step (one shared noise draw) updates the volume. Averaging the noise, never the per-window noisy
samples, keeps the sampler's noise variance (`algorithms.md` §5.1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...io.intensity import HUWindow
from ...io.nifti import affine_from_tensor_spacing
from ...io.regions import Region, RegionRegistry, meddiff_fm_regions
from ...utils.coordinates import window_coordinates
from ...utils.sliding_window import BLEND_MODES, sliding_window_inference, window_locations
from ...utils.validation import as_triple, check_volume_tensor
from ..pipeline_utils_3d import (
    VolumePipeline,
    VolumePipelineOutput,
    scale_model_input,
    thresholding_without_quantiles,
)
from .anomaly import anomaly_scores, check_score_reduction, gaussian_smooth_3d

RECONSTRUCTIONS = ("one_step", "ancestral")


def predict_windowed_noise(
    unet,
    sample: torch.Tensor,
    timestep,
    class_labels: torch.Tensor,
    anatomy: torch.Tensor | None = None,
    controlnet=None,
    controlnet_cond: torch.Tensor | None = None,
    controlnet_conditioning_scale: float = 1.0,
    window_size: int | Sequence[int] = 128,
    overlap: float = 0.5,
    blend: str = "constant",
    window_batch_size: int = 1,
) -> torch.Tensor:
    """A patch denoiser's noise estimate of a whole `(B, C, D, H, W)` sample at one timestep, from overlapping windows.

    Each window is denoised with its global coordinates ([`window_coordinates`]) and its crops of `anatomy` and
    `controlnet_cond` (with the ControlNet's residuals when `controlnet` is given); the estimates are blended with
    per-voxel weights that sum to one ([`sliding_window_inference`]: `overlap`, `blend="constant" | "gaussian"`,
    `window_batch_size` windows per call). A volume that fits one window takes one plain forward pass. Any pipeline
    with a [`PatchUNet3DModel`] prior (sampling, restoration, inpainting) calls this at every step.

    Args:
        unet: A [`PatchUNet3DModel`] (or a model with its `forward` signature).
        sample: The (scaled) noisy volume.
        timestep: The timestep, for every window.
        class_labels: `(B,)` region ids.
        anatomy: `(B, 1, D, H, W)` integer labels over the volume, or `None`.
        controlnet: A [`PatchControlNet3DModel`], or `None`.
        controlnet_cond: `(B, C, D, H, W)` condition over the volume for the ControlNet.
        controlnet_conditioning_scale: Multiplies the ControlNet's residuals.
        window_size: Window side(s); clipped to the volume.
        overlap: Fraction of a window shared with its neighbours.
        blend: `"constant"` or `"gaussian"` per-voxel weights.
        window_batch_size: Windows per denoiser call.
    """
    volume_size = tuple(sample.shape[2:])
    window = tuple(min(w, s) for w, s in zip(as_triple(window_size, "window_size"), volume_size))

    def estimate(windows, locations):
        items = [location[0] for location in locations]
        spatial = [location[2:] for location in locations]
        position = torch.stack(
            [window_coordinates(volume_size, part, device=windows.device, dtype=windows.dtype) for part in spatial]
        )
        labels = torch.cat([class_labels[item] for item in items])
        crops = {}
        if anatomy is not None:
            crops["anatomy"] = torch.cat([anatomy[location] for location in locations])
        residuals = {}
        if controlnet is not None and controlnet_cond is not None:
            condition = torch.cat([controlnet_cond[location] for location in locations])
            down, mid = controlnet(
                windows, timestep, class_labels=labels, position=position, controlnet_cond=condition,
                conditioning_scale=controlnet_conditioning_scale, return_dict=False, **crops,
            )  # fmt: skip
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return unet(windows, timestep, class_labels=labels, position=position, **crops, **residuals).sample

    if window == volume_size:
        whole = [(slice(b, b + 1), slice(None), *(slice(0, side) for side in volume_size)) for b in range(len(sample))]
        return estimate(sample, whole)
    return sliding_window_inference(
        sample, window, estimate, overlap=overlap, mode=blend, batch_size=window_batch_size, with_coordinates=True
    )


@dataclass
class AnomalyDetectionOutput(BaseOutput):
    """Output of [`PatchSlidingWindowPipeline.detect_anomalies`].

    Args:
        anomaly_map: `(B, 1, D, H, W)` `|x - x̂|` in model units (a difference of 2 spans the HU window), smoothed and
            masked as requested.
        reconstruction: `(B, 1, D, H, W)` the model's "healthy" reconstruction `x̂` in `[-1, 1]`.
        scores: `(B,)` image-level anomaly scores (the map reduced over the organ mask).
    """

    anomaly_map: torch.Tensor
    reconstruction: torch.Tensor
    scores: torch.Tensor


class PatchSlidingWindowPipeline(VolumePipeline):
    r"""Generate (and reconstruct) CT volumes of any size with a MedDiff-FM patch denoiser over overlapping windows.

    Components:
        unet ([`PatchUNet3DModel`]): Window noise predictor with global position, region and anatomy conditions.
        scheduler ([`SchedulerMixin`]): Any diffusers scheduler; build others with
            `X.from_config(pipe.scheduler.config)`.
        controlnet ([`PatchControlNet3DModel`], optional): Adds residuals from a condition volume (e.g. a thick-slice
            CT for super-resolution, a lesion mask for lesion generation).

    Configuration (saved in `model_index.json`):
        regions (`list[dict]`): The model's regions with their HU window (`intensity_window`) and voxel spacing;
            MedDiff-FM's head-and-neck, chest and abdomen at 1 mm by default.
        window_size (`int` or three ints): The window the denoiser was trained on, used when a call gives none
            (128 in the paper).
    """

    model_cpu_offload_seq = "controlnet->unet"
    _optional_components = ["controlnet"]
    _callback_tensor_inputs = ["latents", "noise_pred"]

    def __init__(
        self,
        unet,
        scheduler,
        controlnet=None,
        regions: list[dict] | None = None,
        window_size: int | Sequence[int] = 128,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, controlnet=controlnet)
        registry = RegionRegistry(regions) if regions is not None else meddiff_fm_regions()
        window_size = (
            window_size if isinstance(window_size, int) else list(as_triple(tuple(window_size), "window_size"))
        )
        self.register_to_config(regions=registry.to_config(), window_size=window_size)
        self.region_registry = registry

    # ------------------------------------------------------------------------------------------------ requests

    def get_region(self, region: str | int) -> Region:
        """Resolve a region name, alias or class id; unknown names raise a `ValueError` listing the valid ones."""
        return self.region_registry.resolve(region)

    def hu_window(self, region: str | int | Region) -> HUWindow:
        """The region's HU window (HU ↔ `[-1, 1]`)."""
        return self.get_region(region).hu_window()

    def check_sizes(self, volume_size, window_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """`volume_size` and the window (clipped to the volume) as triples, or a `ValueError` before any work."""
        volume_size = as_triple(tuple(volume_size), "volume_size")
        window = as_triple(window_size, "window_size")
        multiple = self.unet.size_multiple
        clipped = tuple(min(w, s) for w, s in zip(window, volume_size))
        if any(side % multiple for side in (*volume_size, *clipped)):
            raise ValueError(
                f"`volume_size` {volume_size} and `window_size` {window} must be multiples of {multiple} (the "
                "denoiser's downsampling factor); pad the volume or choose sides that are."
            )
        return volume_size, clipped

    def prepare_condition(self, condition, name: str, batch: int, volume_size, device, integer: bool = False):
        """A `(B, C, D, H, W)` condition volume from a `(D, H, W)`, `(C, D, H, W)` or batched tensor/array."""
        if condition is None:
            return None
        condition = torch.as_tensor(np.asarray(condition) if not isinstance(condition, torch.Tensor) else condition)
        while condition.ndim < 5:
            condition = condition[None]
        check_volume_tensor(condition, name, allow_integer=integer)
        if tuple(condition.shape[2:]) != tuple(volume_size) or condition.shape[0] not in (1, batch):
            raise ValueError(
                f"`{name}` has shape {tuple(condition.shape)}; it must cover the volume (D, H, W) = "
                f"{tuple(volume_size)} for 1 or {batch} volume(s)."
            )
        return condition.expand(batch, *condition.shape[1:]).to(device)

    # ------------------------------------------------------------------------------------------------ noise

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep,
        class_labels: torch.Tensor,
        anatomy: torch.Tensor | None = None,
        controlnet_cond: torch.Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
        window_size: int | Sequence[int] = 128,
        overlap: float = 0.5,
        blend: str = "constant",
        window_batch_size: int = 1,
    ) -> torch.Tensor:
        """The blended noise estimate of a whole `(B, 1, D, H, W)` sample at one timestep
        ([`predict_windowed_noise`] with this pipeline's denoiser and ControlNet)."""
        controlnet = self.controlnet if controlnet_cond is not None else None
        return predict_windowed_noise(
            self.unet, sample, timestep, class_labels, anatomy, controlnet, controlnet_cond,
            controlnet_conditioning_scale, window_size, overlap, blend, window_batch_size,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------ outputs

    def package_output(self, volumes, regions: list[Region], output_type: str, return_dict: bool):
        """Clip to `[-1, 1]`, map to HU for `"nifti"`, attach each region's affine."""
        volumes = volumes.float().clamp(-1, 1).cpu()
        affines = np.stack([affine_from_tensor_spacing(region.spacing) for region in regions])
        if output_type == "nifti":
            volumes = torch.cat([self.hu_window(region).inverse(v[None]) for region, v in zip(regions, volumes)])
        return self.finish(volumes, affines, [region.name for region in regions], output_type, return_dict)

    @torch.no_grad()
    def __call__(
        self,
        region: str | int | list[str | int] = "Chest",
        volume_size: Sequence[int] | None = None,
        anatomy: torch.Tensor | np.ndarray | None = None,
        controlnet_cond: torch.Tensor | np.ndarray | None = None,
        controlnet_conditioning_scale: float = 1.0,
        window_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "constant",
        window_batch_size: int = 1,
        num_inference_steps: int = 100,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VolumePipelineOutput | tuple:
        r"""Generate CT volumes.

        Args:
            region: Region name, alias or class id (or a list: one volume each), e.g. `"Chest"`.
            volume_size: `(D, H, W)` in voxels of the region's spacing; defaults to the region's size. Sides must be
                multiples of the denoiser's downsampling factor; any size larger than a window is tiled.
            anatomy: Integer anatomy labels `(D, H, W)` or `(B, 1, D, H, W)` over the whole volume (0 background),
                for anatomy-conditioned models.
            controlnet_cond: Condition volume `(D, H, W)` or `(B, C, D, H, W)` for the ControlNet, in model space.
            controlnet_conditioning_scale: Multiplies the ControlNet's residuals.
            window_size: Window side(s) in voxels; defaults to the pipeline's `window_size` (the training patch, 128 in
                the paper).
            overlap: Fraction of a window shared with its neighbours (0.5: stride 64 for 128³ windows).
            blend: Per-voxel weights of each window's noise: `"constant"` (plain average) or `"gaussian"`.
            window_batch_size: Windows per denoiser call (speed and memory, not results).
            num_inference_steps: Denoising steps.
            generator: One `torch.Generator` or one per volume.
            latents: Initial noise `(B, 1, D, H, W)` instead of drawing it (unscaled).
            eta: DDIM stochasticity, passed to schedulers whose `step` takes it.
            output_type: `"np"` / `"pt"` (model space, `[-1, 1]`) or `"nifti"` (HU, the region's spacing).
            return_dict: Return a [`VolumePipelineOutput`] rather than a tuple.
            callback_on_step_end: Called after every step as `callback(pipe, step, timestep, kwargs)`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback (`latents`, `noise_pred`).
        """
        # 1. Check the request before any model runs.
        names = list(region) if isinstance(region, list | tuple) else [region]
        regions = [self.get_region(name) for name in names]
        if output_type == "latent":
            raise ValueError("This pipeline works in image space: `output_type` must be 'np', 'pt' or 'nifti'.")
        self.check_output_type(output_type)
        if blend not in BLEND_MODES:
            raise ValueError(f"`blend` must be one of {BLEND_MODES}, got {blend!r}.")
        if output_type == "nifti":
            for item in regions:
                self.hu_window(item)
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        window_size = self.config.window_size if window_size is None else window_size
        if volume_size is None:
            sizes = {tuple(item.volume_size or ()) for item in regions}
            if len(sizes) != 1 or () in sizes:
                raise ValueError("Pass `volume_size=(D, H, W)`: the requested regions have no common default size.")
            volume_size = sizes.pop()
        volume_size, _ = self.check_sizes(volume_size, window_size)
        window_locations(volume_size, window_size, overlap)  # validates `overlap`
        device = self._execution_device
        batch = len(regions)
        anatomy = self.prepare_condition(anatomy, "anatomy", batch, volume_size, device, integer=True)
        controlnet_cond = self.prepare_condition(controlnet_cond, "controlnet_cond", batch, volume_size, device)
        if controlnet_cond is not None and self.controlnet is None:
            raise ValueError("`controlnet_cond` was given but the pipeline has no `controlnet`.")
        class_labels = torch.tensor([item.class_id for item in regions], device=device)
        windowing = dict(window_size=window_size, overlap=overlap, blend=blend, window_batch_size=window_batch_size)

        # 2. Timesteps first: the initial noise scale of Euler-type schedulers depends on them.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self.warn_if_unbounded_start(timesteps)
        shape = (batch, self.unet.config.in_channels, *volume_size)
        latents = self.prepare_noise(shape, generator, device, self.unet.dtype, latents)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 3. Denoise: one blended noise estimate and one scheduler step per timestep, for the whole volume.
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        with self.progress_bar(total=len(timesteps)) as progress_bar, thresholding_without_quantiles(self.scheduler):
            for step, t in enumerate(timesteps):
                if self.interrupt:
                    break
                model_input = scale_model_input(self.scheduler, latents, t)
                noise_pred = self.predict_noise(
                    model_input, t, class_labels, anatomy, controlnet_cond, controlnet_conditioning_scale, **windowing
                )
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs).prev_sample
                if callback_on_step_end is not None:
                    available = {"latents": latents, "noise_pred": noise_pred}
                    callback_kwargs = {name: available[name] for name in tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 4. Model space to the requested form, with each region's geometry.
        return self.package_output(latents, regions, output_type, return_dict)

    @torch.no_grad()
    def detect_anomalies(
        self,
        volume: torch.Tensor,
        region: str | int,
        anatomy: torch.Tensor | np.ndarray | None = None,
        timestep: int = 950,
        reconstruction: str = "one_step",
        num_inference_steps: int = 50,
        organ_mask: torch.Tensor | np.ndarray | None = None,
        smoothing_sigma: float = 0.0,
        score_reduction: str | float = "max",
        window_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "gaussian",
        window_batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> AnomalyDetectionOutput | tuple:
        r"""Zero-shot anomaly detection by reconstruction (MedDiff-FM §anomaly detection).

        The volume is diffused to `timestep` and reconstructed by the (anatomy-conditioned) model, which restores
        what it has learnt as normal anatomy; the anomaly map is `|x - x̂|`.

        Args:
            volume: `(B, 1, D, H, W)` (or `(D, H, W)`) in model space `[-1, 1]`: window HU first with
                `pipe.hu_window(region)(hu)`.
            region: Region of the volume(s).
            anatomy: Integer anatomy labels over the volume (0 background), for anatomy-conditioned models.
            timestep: Diffusion time of the forward noising (950 in the paper: `alpha_bar` ≈ 0.006 on the cosine
                schedule, so little but the anatomy survives).
            reconstruction: `"one_step"` (the model's `x̂0` prediction at `timestep`) or `"ancestral"` (the
                scheduler's reverse chain from the last of its `num_inference_steps` timesteps at or below `timestep`).
            num_inference_steps: Scheduler steps of the full schedule for `"ancestral"`.
            organ_mask: Voxels to keep (e.g. the liver); the map is zero outside and scores use only these voxels.
            smoothing_sigma: Gaussian smoothing of the map in voxels (0: none).
            score_reduction: `"max"`, `"mean"` or a quantile in `(0, 1)` of the map inside the mask.
            window_size / overlap / blend / window_batch_size: Windowing, as in `__call__`.
            generator: For the forward noise.
            return_dict: Return an [`AnomalyDetectionOutput`] rather than a tuple.
        """
        # 1. Check the request.
        item = self.get_region(region)
        volume = torch.as_tensor(volume)
        while volume.ndim < 5:
            volume = volume[None]
        check_volume_tensor(volume, "volume", channels=self.unet.config.in_channels)
        if volume.min() < -1.001 or volume.max() > 1.001:
            raise ValueError(
                f"`volume` must be in model space [-1, 1] (got [{float(volume.min()):.3g}, "
                f"{float(volume.max()):.3g}]); map HU with `pipe.hu_window(region)(hu)` first."
            )
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"`reconstruction` must be one of {RECONSTRUCTIONS}, got {reconstruction!r}.")
        check_score_reduction(score_reduction)
        window_size = self.config.window_size if window_size is None else window_size
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 0 <= int(timestep) < num_train_timesteps:
            raise ValueError(f"`timestep` must be in [0, {num_train_timesteps}), got {timestep}.")
        if getattr(self.scheduler, "alphas_cumprod", None) is None:
            raise ValueError(f"{type(self.scheduler).__name__} has no `alphas_cumprod`; use a DDPM/DDIM scheduler.")
        volume_size, _ = self.check_sizes(volume.shape[2:], window_size)
        device = self._execution_device
        batch = volume.shape[0]
        volume = volume.to(device=device, dtype=self.unet.dtype)
        anatomy = self.prepare_condition(anatomy, "anatomy", batch, volume_size, device, integer=True)
        mask = self.prepare_condition(organ_mask, "organ_mask", batch, volume_size, device, integer=True)
        mask = None if mask is None else mask.bool()
        class_labels = torch.full((batch,), item.class_id, device=device)
        windowing = dict(window_size=window_size, overlap=overlap, blend=blend, window_batch_size=window_batch_size)
        self.check_generators(generator, batch)

        # 2. Forward-diffuse to the starting time, then reconstruct.
        if reconstruction == "ancestral":
            self.scheduler.set_timesteps(num_inference_steps, device=device)
            timesteps = self.scheduler.timesteps[self.scheduler.timesteps <= int(timestep)]
            if not len(timesteps):
                raise ValueError(f"No step of the {num_inference_steps}-step schedule is at or below t={timestep}.")
        else:
            timesteps = torch.tensor([int(timestep)], device=device)
        noise = randn_tensor(volume.shape, generator=generator, device=device, dtype=volume.dtype)
        sample = self.scheduler.add_noise(volume, noise, timesteps[:1].repeat(batch))
        if reconstruction == "one_step":
            alpha_bar = self.scheduler.alphas_cumprod[int(timesteps[0])].to(device=device, dtype=volume.dtype)
            noise_pred = self.predict_noise(sample, timesteps[0], class_labels, anatomy, **windowing)
            restored = (sample - (1 - alpha_bar).sqrt() * noise_pred) / alpha_bar.sqrt()
        else:
            extra_step_kwargs = self.prepare_extra_step_kwargs(generator, 0.0)
            with thresholding_without_quantiles(self.scheduler):
                for t in self.progress_bar(timesteps):
                    model_input = scale_model_input(self.scheduler, sample, t)
                    noise_pred = self.predict_noise(model_input, t, class_labels, anatomy, **windowing)
                    sample = self.scheduler.step(noise_pred, t, sample, **extra_step_kwargs).prev_sample
            restored = sample
        restored = restored.clamp(-1, 1)

        # 3. The map, its post-processing and the image-level scores.
        anomaly_map = gaussian_smooth_3d((volume - restored).abs().float(), smoothing_sigma)
        if mask is not None:
            anomaly_map = anomaly_map * mask
        scores = anomaly_scores(anomaly_map, mask, score_reduction)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (anomaly_map, restored, scores)
        return AnomalyDetectionOutput(anomaly_map=anomaly_map, reconstruction=restored, scores=scores)
