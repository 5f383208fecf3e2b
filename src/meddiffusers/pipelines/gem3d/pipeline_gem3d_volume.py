"""`GEM3DVolumePipeline`: a whole 3D volume from a segmentation mask and one informed slice (GEM-3D).

GEM-3D (Zhu et al., *Generative Enhancement for 3D Medical Images*, HKU-MedAI/GEM-3D@3c0e3ca) is a 2-D latent
diffusion model inflated to pseudo-3D: its U-Net sees windows of 16 consecutive slices, conditioned per slice on the
VAE latent of the mask and on the latent of one "informed slice" that carries the patient's appearance. A volume is
generated window by window, up then down from the informed slice's position; the slices a window shares with the
previous one are anchored to what was generated there ("RePaint on the overlap"): after every step they are replaced
by the anchor latent noised to a lower level.

The informed slice comes from another real volume (the original's `ic` mode), from the slice generator at a chosen or
random position (`ig`), or from the target volume itself (`test`). See `docs/source/en/api/pipelines/gem3d_volume.md`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from diffusers import AutoencoderKL, ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from ...io.nifti import NiftiVolume, nifti_image_to_tensor, save_nifti, tensor_to_nifti_image
from ..pipeline_utils_3d import VolumePipeline, VolumePipelineOutput, scale_model_input
from .mask_processing import check_label_mask, encode_slices, prepare_image_slice, prepare_mask, resize_slices
from .scheduling import gem3d_ddim_scheduler, set_original_timesteps
from .window_schedule import GEOMETRIES, plan_windows

ANCHOR_NOISE_MODES = ("reference", "matched")
OUTPUT_RESOLUTIONS = ("mask", "model")
NO_SLICE_GENERATOR = (
    "No informed slice was given and the pipeline has no `slice_unet` to generate one: pass "
    "`informed_slice=(volume, index)` or `informed_latents=...`, or load a slice generator."
)


@dataclass
class GEM3DVolumePipelineOutput(VolumePipelineOutput):
    """Generated volumes with their masks.

    Args:
        volumes: `(B, 1, S, H, W)` images in `[-1, 1]` (`"pt"` / `"np"`), NIfTI images (`"nifti"`), or the latent
            volume `(B, 4, S, h, w)` (`"latent"`).
        affines: `(B, 4, 4)` voxel-to-world matrices (the mask's).
        regions: Unused (`None`).
        masks: The label maps the volumes were generated for, on the same grid and in the same form as `volumes`
            (`None` with the latent entry).
        start_slice: The slice the informed slice belongs to.
    """

    masks: torch.Tensor | np.ndarray | list | None = None
    start_slice: int | None = None

    def save(self, output, indices=None, total=None, with_masks: bool = True) -> list[str]:
        """Write each volume as NIfTI (see [`VolumePipelineOutput.save`]) and, with `with_masks`, its mask next to it
        as `<name>_mask.nii.gz` (same grid and affine): a paired image/label volume. Returns the paths written."""
        paths = super().save(output, indices, total)
        if not with_masks or self.masks is None:
            return paths
        masks = self.masks
        if isinstance(masks, list):
            masks = [nifti_image_to_tensor(image) for image in masks]
        written = []
        for path, mask, affine in zip(paths, masks, self.affines):
            extension = ".nii.gz" if path.endswith(".nii.gz") else ".nii"
            mask_path = f"{path[: -len(extension)]}_mask{extension}"
            save_nifti(torch.as_tensor(mask).float(), mask_path, affine=affine)
            written += [path, mask_path]
        return written


def _batched(volume, name: str) -> tuple[torch.Tensor, np.ndarray | None]:
    """A NiftiVolume or a `(D, H, W)` / `(B, 1, D, H, W)` tensor as `(B, 1, D, H, W)`, with the affine if known."""
    affine = None
    if isinstance(volume, NiftiVolume):
        volume, affine = volume.tensor, np.asarray(volume.affine, dtype=np.float64)
    if isinstance(volume, np.ndarray):
        volume = torch.from_numpy(volume)
    if not isinstance(volume, torch.Tensor):
        raise ValueError(f"`{name}` must be a NiftiVolume or a tensor, got {type(volume).__name__}.")
    if volume.ndim == 3:
        volume = volume[None, None]
    if volume.ndim != 5 or volume.shape[1] != 1:
        raise ValueError(
            f"`{name}` must be a (D, H, W) or (B, 1, D, H, W) volume (D = slice axis), got {tuple(volume.shape)}."
        )
    return volume, affine


def _model_grid_affine(affine: np.ndarray, size: tuple[int, int], resolution: tuple[int, int]) -> np.ndarray:
    """The affine of a volume whose `(H, W)` slices were resized from `size` to `resolution` (voxel centres kept)."""
    scale = np.eye(4)
    for axis, (old, new) in enumerate(zip(size, resolution)):
        factor = old / new
        scale[axis, axis] = factor
        scale[axis, 3] = (factor - 1) / 2
    return affine @ scale


def original_resolution(original_config, vae) -> int | None:
    """The image size the original model was trained at: latent `image_size` times the VAE's downsampling (512 for
    the released models), read from the original config; `None` without one."""
    from ...loaders.original_gem3d_checkpoint import read_original_config

    config = read_original_config(original_config)
    if config is None or "image_size" not in config["model"]["params"]:
        return None
    return int(config["model"]["params"]["image_size"]) * 2 ** (len(vae.config.block_out_channels) - 1)


class GEM3DVolumePipeline(VolumePipeline):
    r"""Generate a 3D volume that matches a label mask, window by window with anchored overlaps (GEM-3D).

    Args:
        vae: `AutoencoderKL` (KL-f8 in the released models; `scaling_factor` 0.18215) for masks, slices and outputs.
        unet: `GEM3DUNetModel` predicting the noise of a window from `[x_t | mask latents | informed latent]`.
        scheduler: Any diffusers scheduler; GEM-3D's sampler is [`gem3d_ddim_scheduler`] (DDIM, `eta = 1`).
        slice_unet: Optional slice generator (`UNet2DConditionModel` conditioned on the relative slice position)
            used when no informed slice is given.
        max_label: Largest label of the masks (3 for the brain model, 4 for the abdomen model).
        resolution: In-plane size the slices are resized to before encoding (512 in the original); `None` means
            64 latent pixels, i.e. `64 * vae_scale_factor`.
    """

    model_cpu_offload_seq = "slice_unet->unet->vae"
    _optional_components = ["slice_unet"]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        vae: AutoencoderKL,
        unet: ModelMixin,
        scheduler: SchedulerMixin,
        slice_unet: ModelMixin | None = None,
        max_label: int = 3,
        resolution: int | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, slice_unet=slice_unet)
        self.register_to_config(max_label=max_label, resolution=resolution)

    @property
    def vae_scale_factor(self) -> int:
        """Downsampling factor of the VAE (8 for KL-f8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @classmethod
    def from_single_file(
        cls,
        volume_checkpoint: str | os.PathLike,
        slice_checkpoint: str | os.PathLike | None = None,
        original_config=None,
        slice_original_config=None,
        use_ema: bool = False,
        slice_use_ema: bool = False,
        scheduler: SchedulerMixin | None = None,
        **kwargs,
    ) -> GEM3DVolumePipeline:
        """Build the pipeline from the original Lightning checkpoints (read safely, no code execution).

        Args:
            volume_checkpoint: The stage-2 (pseudo-3D) `.ckpt`; a stage-1 file gives the 2-D model.
            slice_checkpoint: The informed-slice generator `.ckpt`, if any.
            original_config: The original project YAML (path) or its parsed `{"model": {...}}`; `None` infers the
                architecture from the weights.
            slice_original_config: The same for the slice generator.
            use_ema: Load the volume model's EMA weights (the original inference uses the raw weights).
            slice_use_ema: The same for the slice generator.
            scheduler: Scheduler to use; default GEM-3D's DDIM with the checkpoint's beta schedule.
            **kwargs: `max_label`, `resolution` (pipeline configuration; `resolution` defaults to the original
                config's `image_size` times the VAE's downsampling factor).
        """
        from ...loaders.original_gem3d_checkpoint import load_gem3d_components

        components = load_gem3d_components(
            volume_checkpoint,
            slice_checkpoint=slice_checkpoint,
            original_config=original_config,
            slice_original_config=slice_original_config,
            use_ema=use_ema,
            slice_use_ema=slice_use_ema,
        )
        if scheduler is None:
            scheduler = gem3d_ddim_scheduler(**components.get("scheduler_config", {}))
        if kwargs.get("resolution") is None:
            kwargs["resolution"] = original_resolution(original_config, components["vae"])
        return cls(
            vae=components["vae"],
            unet=components["unet"],
            scheduler=scheduler,
            slice_unet=components.get("slice_unet"),
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ helpers

    def _draw(self, shape, generator, device, dtype) -> torch.Tensor:
        # Every random draw of the pipeline: one `randn_tensor` call with the shape of the draw.
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    def _draw_frames(self, batch, frames, size, generator, device, dtype) -> torch.Tensor:
        """A `(B, C, F, h, w)` standard-normal tensor drawn frame-major `(B, F, C, h, w)` (the original's order)."""
        channels, (h, w) = self.unet.config.out_channels, size
        return self._draw((batch, frames, channels, h, w), generator, device, dtype).permute(0, 2, 1, 3, 4)

    def encode_mask_window(self, masks: torch.Tensor, generator, dtype) -> torch.Tensor:
        """VAE latents `(B, 4, F, h, w)` of a `(B, 1, F, H, W)` window of prepared masks (one posterior draw)."""
        B, _, frames, H, W = masks.shape
        h, w = H // self.vae_scale_factor, W // self.vae_scale_factor
        noise = self._draw((B, frames, self.vae.config.latent_channels, h, w), generator, masks.device, dtype)
        images = masks.permute(0, 2, 1, 3, 4).reshape(B * frames, 1, H, W)
        latents = encode_slices(self.vae, images, noise.reshape(B * frames, -1, h, w))
        return latents.reshape(B, frames, -1, h, w).permute(0, 2, 1, 3, 4).to(dtype)

    def decode_latents(self, latents: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """`(B, 4, S, h, w)` latents to `(B, 1, S, H, W)` images in `[-1, 1]`, decoding `chunk` slices at a time."""
        B, C, S, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(B * S, C, h, w) / self.vae.config.scaling_factor
        images = [self.vae.decode(flat[i : i + chunk].to(self.vae.dtype)).sample for i in range(0, B * S, chunk)]
        images = torch.cat(images).clamp(-1, 1)[:, :1]
        return images.reshape(B, S, 1, *images.shape[-2:]).permute(0, 2, 1, 3, 4).float()

    def generate_informed_latents(
        self,
        batch: int,
        position: float,
        latent_size: tuple[int, int],
        num_inference_steps: int = 200,
        eta: float = 1.0,
        generator=None,
        original_step_count: bool = False,
    ) -> torch.Tensor:
        """An informed-slice latent `(B, 4, h, w)` from the slice generator at relative position `position` (k / S).

        Draws `x_T` `(B, 4, h, w)`, then the variance noise of every step (DDIM with `eta > 0`), as the original.
        """
        from ...models.embeddings import slice_position_embedding

        if self.slice_unet is None:
            raise ValueError(NO_SLICE_GENERATOR)
        device, dtype = self._execution_device, self.slice_unet.dtype
        dim = getattr(self.slice_unet.config, "cross_attention_dim", None) or 128
        positions = torch.full((batch,), position, dtype=torch.float32)
        context = slice_position_embedding(positions, dim=dim)[:, None].to(device=device, dtype=dtype)
        self._set_timesteps(num_inference_steps, device, original_step_count)
        h, w = latent_size
        latents = self._draw((batch, self.slice_unet.config.in_channels, h, w), generator, device, dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        extra = self.prepare_extra_step_kwargs(generator, eta)
        for t in self.scheduler.timesteps:
            eps = self.slice_unet(
                scale_model_input(self.scheduler, latents, t), t, encoder_hidden_states=context
            ).sample
            step_kwargs = dict(extra)
            if self._takes_variance_noise and eta > 0:
                step_kwargs["variance_noise"] = self._draw(latents.shape, generator, device, dtype)
                step_kwargs.pop("generator", None)
            latents = self.scheduler.step(eps, t, latents, **step_kwargs).prev_sample
        return latents

    def _set_timesteps(self, num_inference_steps: int, device, original_step_count: bool) -> torch.Tensor:
        if original_step_count:
            set_original_timesteps(self.scheduler, num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        return self.scheduler.timesteps

    @property
    def _takes_variance_noise(self) -> bool:
        import inspect

        return "variance_noise" in inspect.signature(self.scheduler.step).parameters

    def _noised_anchor(self, anchor, noise, mode: str, step: int, timesteps) -> torch.Tensor:
        """The anchor latents at the noise level of the sample before step `step` (`step = len(timesteps)`: end)."""
        n = len(timesteps)
        if mode == "reference":
            # The original indexes the 1000-step table with the DDIM step index (n - 1 ... 0), and with T - 1 at x_T.
            alphas_cumprod = self.scheduler.alphas_cumprod
            alpha = alphas_cumprod[-1] if step == 0 else alphas_cumprod[n - step]
            alpha = alpha.to(anchor)
            return alpha.sqrt() * anchor + (1 - alpha).sqrt() * noise
        if step == n:
            return anchor
        return self.scheduler.add_noise(anchor, noise, timesteps[step].reshape(1))

    def sample_window(
        self,
        condition: torch.Tensor,
        anchor: torch.Tensor | None = None,
        anchor_frames: tuple[int, int] | None = None,
        num_inference_steps: int = 200,
        eta: float = 1.0,
        anchor_noise: str = "matched",
        generator=None,
        original_step_count: bool = False,
        progress_bar=None,
        step_callback: Callable | None = None,
    ) -> torch.Tensor:
        """One window's denoising run, anchored on `anchor_frames` if an anchor is given.

        Draws, in order (each one `randn_tensor` call, frame-major `(B, F, C, h, w)` like the original): `x_T`; the
        anchor's initial noise; then per step the scheduler's variance noise (DDIM with `eta > 0`) and the anchor's
        re-noising (not at the last step with `anchor_noise="matched"`, where the anchor is put back clean).

        Args:
            condition: `(B, 8, F, h, w)` = `[mask latents | informed latent repeated over the frames]`.
            anchor: `(B, 4, n, h, w)` latents the frames `anchor_frames = (first, first + n)` are pinned to.
            anchor_noise: `"reference"` or `"matched"` (see `__call__`).
            step_callback: `step_callback(step, timestep, latents) -> latents`, called after every step.

        Returns:
            The `(B, 4, F, h, w)` sampled window.
        """
        device, dtype = condition.device, self.unet.dtype
        batch, frames, size = condition.shape[0], condition.shape[2], tuple(condition.shape[-2:])
        timesteps = self._set_timesteps(num_inference_steps, device, original_step_count)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        draw_step_noise = self._takes_variance_noise and eta > 0
        latents = self._draw_frames(batch, frames, size, generator, device, dtype)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)
        if anchor is not None:
            anchored = slice(*anchor_frames)
            noise = self._draw_frames(batch, anchor.shape[2], size, generator, device, dtype)
            latents[:, :, anchored] = self._noised_anchor(anchor, noise, anchor_noise, 0, timesteps)

        for i, t in enumerate(timesteps):
            model_input = torch.cat([scale_model_input(self.scheduler, latents, t), condition], dim=1)
            noise_pred = self.unet(model_input, t).sample
            step_kwargs = dict(extra_step_kwargs)
            if draw_step_noise:
                step_kwargs["variance_noise"] = self._draw_frames(batch, frames, size, generator, device, dtype)
                step_kwargs.pop("generator", None)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
            if anchor is not None:
                if anchor_noise == "reference" or i < len(timesteps) - 1:
                    noise = self._draw_frames(batch, anchor.shape[2], size, generator, device, dtype)
                latents[:, :, anchored] = self._noised_anchor(anchor, noise, anchor_noise, i + 1, timesteps)
            if step_callback is not None:
                latents = step_callback(i, t, latents)
            if progress_bar is not None:
                progress_bar.update()
        return latents

    def _run_callback(self, callback, tensor_inputs, first_step: int, step: int, timestep, latents) -> torch.Tensor:
        """Hand a window's `latents` to the user's step callback; it may return replacements."""
        outputs = callback(self, first_step + step, timestep, {name: latents for name in tensor_inputs})
        return outputs.pop("latents", latents)

    def check_inputs(
        self,
        mask,
        mask_latents,
        informed_slice,
        informed_latents,
        window_length,
        overlap,
        geometry,
        anchor_noise,
        output_type,
        output_resolution,
        max_label,
    ):
        """Raise `ValueError` for arguments that cannot work, before any model runs."""
        self.check_output_type(output_type)
        if (mask is None) == (mask_latents is None):
            raise ValueError("Pass exactly one of `mask` (a label volume) and `mask_latents` (its VAE latents).")
        if geometry not in GEOMETRIES:
            raise ValueError(f"`geometry` must be one of {GEOMETRIES}, got {geometry!r}.")
        if anchor_noise not in ANCHOR_NOISE_MODES:
            raise ValueError(f"`anchor_noise` must be one of {ANCHOR_NOISE_MODES}, got {anchor_noise!r}.")
        if output_resolution not in OUTPUT_RESOLUTIONS:
            raise ValueError(f"`output_resolution` must be one of {OUTPUT_RESOLUTIONS}, got {output_resolution!r}.")
        if informed_slice is not None and informed_latents is not None:
            raise ValueError("Pass at most one of `informed_slice` and `informed_latents`.")
        if mask_latents is not None:
            if not isinstance(mask_latents, torch.Tensor) or mask_latents.ndim != 5:
                raise ValueError("`mask_latents` must be a (B, 4, S, h, w) tensor.")
            if not torch.isfinite(mask_latents).all():
                raise ValueError("`mask_latents` contains NaN or infinite values.")
        if informed_slice is not None and not (isinstance(informed_slice, tuple | list) and len(informed_slice) == 2):
            raise ValueError(
                "`informed_slice` must be `(volume, slice_index)` (a NiftiVolume or tensor and an int); pass a latent "
                "as `informed_latents=`."
            )
        if not isinstance(max_label, int) or max_label < 1:
            raise ValueError(f"`max_label` must be a positive int, got {max_label!r}.")
        if not isinstance(window_length, int) or not isinstance(overlap, int):
            raise ValueError(f"`window_length` and `overlap` must be ints, got {window_length!r}, {overlap!r}.")

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        mask: NiftiVolume | torch.Tensor | None = None,
        informed_slice: tuple | None = None,
        start_slice: int | None = None,
        window_length: int = 16,
        overlap: int = 1,
        num_inference_steps: int = 200,
        eta: float = 1.0,
        geometry: str = "exact",
        anchor_noise: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "nifti",
        return_dict: bool = True,
        mask_latents: torch.Tensor | None = None,
        informed_latents: torch.Tensor | None = None,
        max_label: int | None = None,
        resolution: int | None = None,
        output_resolution: str = "mask",
        original_step_count: bool = False,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> GEM3DVolumePipelineOutput | tuple:
        r"""Generate volumes for the given masks.

        Args:
            mask: Label map, a NiftiVolume or a `(D, H, W)` / `(B, 1, D, H, W)` tensor with integer labels in
                `[0, max_label]`; `D` is the slice axis the windows run along.
            informed_slice: `(volume, index)`: slice `index` of an image volume (NiftiVolume or tensor) gives the
                appearance; another patient's volume is the original's `ic` mode, the target's own volume `test`.
                `None` (and no `informed_latents`): the slice generator makes it (`ig`).
            start_slice: Slice of the mask the informed slice stands for. Default: random (from `generator`).
            window_length: Slices per window (the model's 16 frames).
            overlap: Slices shared by consecutive windows (anchored).
            num_inference_steps: Denoising steps per window.
            eta: DDIM stochasticity (1 in the original).
            geometry: `"exact"` (every slice generated once, anchors where they belong) or `"reference"` (the
                original's schedule, quirks included; see [`~pipelines.gem3d.window_schedule`]).
            anchor_noise: `"matched"`: the anchor is noised to the current timestep's level (clean at the end);
                `"reference"`: the original's table lookup with the DDIM step index. Default: `"reference"` with
                `geometry="reference"`, else `"matched"`.
            generator: Torch generator(s) for every random draw.
            output_type: `"nifti"`, `"pt"`, `"np"` or `"latent"` (the `(B, 4, S, h, w)` latent volume).
            return_dict: Return a [`GEM3DVolumePipelineOutput`] (else a tuple `(volumes, affines, masks)`).
            mask_latents: `(B, 4, S, h, w)` already encoded masks instead of `mask` (no VAE encoding, no draws).
            informed_latents: `(B, 4, h, w)` informed-slice latent instead of `informed_slice`.
            max_label: Largest label (default: the pipeline's `max_label`).
            resolution: In-plane size of the model input (default: the pipeline's `resolution`).
            output_resolution: `"mask"`: volumes resized back to the mask's grid (same affine); `"model"`: the
                model's grid, with the affine adjusted.
            original_step_count: Visit the original's DDIM timesteps for `num_inference_steps` (more steps when it
                does not divide 1000; see [`~pipelines.gem3d.scheduling`]).
            callback_on_step_end: Called after every step of every window as `callback(pipe, step, timestep,
                kwargs)`, `step` counting over all windows; may return a dict replacing the window's `latents`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback (`["latents"]`, the window's).
        """
        max_label = self.config.max_label if max_label is None else max_label
        anchor_noise = anchor_noise or ("reference" if geometry == "reference" else "matched")
        self.check_inputs(
            mask,
            mask_latents,
            informed_slice,
            informed_latents,
            window_length,
            overlap,
            geometry,
            anchor_noise,
            output_type,
            output_resolution,
            max_label,
        )
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device, dtype = self._execution_device, self.unet.dtype
        resolution = resolution or self.config.resolution or 64 * self.vae_scale_factor
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)

        # 1. Masks (checked before any work) and the window plan.
        affines = labels = None
        if mask is not None:
            labels, affine = _batched(mask, "mask")
            check_label_mask(labels, max_label)
            batch, num_slices = labels.shape[0], labels.shape[2]
            affines = np.stack([affine if affine is not None else np.eye(4)] * batch)
            latent_size = (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor)
        else:
            batch, _, num_slices = mask_latents.shape[:3]
            latent_size = tuple(mask_latents.shape[-2:])
            affines = np.stack([np.eye(4)] * batch)
        self.check_generators(generator, batch)
        if start_slice is None:
            first = generator[0] if isinstance(generator, list) else generator
            start_slice = int(
                torch.randint(num_slices, (1,), generator=first, device=first.device if first else "cpu")
            )
        windows = plan_windows(num_slices, start_slice, window_length, overlap, geometry)
        if informed_latents is not None and tuple(informed_latents.shape) != (batch, 4, *latent_size):
            raise ValueError(
                f"`informed_latents` must have shape {(batch, 4, *latent_size)}, got {tuple(informed_latents.shape)}."
            )
        reference_volume = None
        if informed_slice is not None:
            reference_volume, _ = _batched(informed_slice[0], "informed_slice")
            if reference_volume.shape[0] not in (1, batch) or not torch.isfinite(reference_volume.float()).all():
                raise ValueError("`informed_slice` must be a finite volume with one item or one per mask.")
        if informed_slice is None and informed_latents is None and self.slice_unet is None:
            raise ValueError(NO_SLICE_GENERATOR)

        # 2. The informed-slice latent, before the windows (as the original scripts draw it).
        if informed_latents is not None:
            informed = informed_latents.to(device=device, dtype=dtype)
        elif informed_slice is not None:
            image = prepare_image_slice(reference_volume, int(informed_slice[1]), size).to(device)
            image = image.expand(batch, -1, -1, -1)
            h, w = latent_size
            noise = self._draw((batch, self.vae.config.latent_channels, h, w), generator, device, dtype)
            informed = encode_slices(self.vae, image, noise).to(dtype)
        else:
            informed = self.generate_informed_latents(
                batch, start_slice / num_slices, latent_size, num_inference_steps, eta, generator, original_step_count
            ).to(dtype)

        model_masks = prepare_mask(labels, max_label, size).to(device) if labels is not None else None
        result = torch.zeros(
            (batch, self.unet.config.out_channels, num_slices, *latent_size), device=device, dtype=dtype
        )
        samples = {}
        timesteps = self._set_timesteps(num_inference_steps, device, original_step_count)
        self._num_timesteps = len(timesteps)

        # 3. The windows, in the original's order; each is one anchored denoising run.
        step_callback = None
        with self.progress_bar(total=len(windows) * len(timesteps)) as progress_bar:
            for window_number, window in enumerate(windows):
                if callback_on_step_end is not None:
                    first_step = window_number * len(timesteps)
                    step_callback = partial(self._run_callback, callback_on_step_end, tensor_inputs, first_step)

                frames = slice(window.start, window.stop)
                if model_masks is not None:
                    condition = self.encode_mask_window(model_masks[:, :, frames], generator, dtype)
                else:
                    condition = mask_latents[:, :, frames].to(device=device, dtype=dtype)
                if window.informed_from is None:
                    informed_window = informed
                else:
                    source, frame = window.informed_from
                    informed_window = samples[source][:, :, frame]
                condition = torch.cat(
                    [condition, informed_window[:, :, None].expand(-1, -1, window_length, -1, -1)], dim=1
                )

                anchor = None
                if window.anchor_frames is not None:
                    source, first = window.anchor_source
                    count = window.anchor_frames[1] - window.anchor_frames[0]
                    anchor = samples[source][:, :, first : first + count]
                latents = self.sample_window(
                    condition,
                    anchor=anchor,
                    anchor_frames=window.anchor_frames,
                    num_inference_steps=num_inference_steps,
                    eta=eta,
                    anchor_noise=anchor_noise,
                    generator=generator,
                    original_step_count=original_step_count,
                    progress_bar=progress_bar,
                    step_callback=step_callback,
                )
                samples[window.index] = latents
                slice_start, slice_stop, frame_start = window.writes
                result[:, :, slice_start:slice_stop] = latents[
                    :, :, frame_start : frame_start + slice_stop - slice_start
                ]

        # 4. Outputs.
        if output_type == "latent":
            volumes = result
        else:
            volumes = self.decode_latents(result)
        out_masks = labels.float() if labels is not None else None
        if output_type != "latent" and labels is not None:
            if output_resolution == "mask":
                volumes = resize_slices(volumes, tuple(labels.shape[-2:]), mode="bilinear").clamp(-1, 1)
            else:
                affines = np.stack([_model_grid_affine(a, tuple(labels.shape[-2:]), size) for a in affines])
                out_masks = resize_slices(out_masks, size, mode="nearest")
        volumes = self.postprocess(volumes.cpu(), affines, output_type)
        if out_masks is not None and output_type in ("np", "nifti"):
            out_masks = (
                out_masks.numpy()
                if output_type == "np"
                else [tensor_to_nifti_image(m[None], a) for m, a in zip(out_masks, affines)]
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (volumes, affines, out_masks)
        return GEM3DVolumePipelineOutput(volumes=volumes, affines=affines, masks=out_masks, start_slice=start_slice)
