"""`DiffPIRPipeline`: plug-and-play restoration of volumes with a diffusion prior (DiffPIR, Zhu et al., CVPR-W 2023).

A port of yuanzhi-zhu/DiffPIR@111d26e (`main_ddpir.py`, `main_ddpir_inpainting.py`) to any
[`~operators.LinearOperator`], 3D volumes, pixel-space priors (windowed for [`PatchUNet3DModel`]) and latent priors.
Each step: the prior's clipped `x̂₀`, a data step `argmin_x ||A x - y||² + rho_t ||x - x̂₀||²`, and DiffPIR's
re-noising to the next timestep (`algorithms.md` §3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ModelMixin, SchedulerMixin
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import torch_utils
from diffusers.utils.torch_utils import randn_tensor

from ...io.nifti import affine_from_tensor_spacing
from ...io.regions import RegionRegistry
from ...models import BiFlowNet3DModel, PatchUNet3DModel, VQModel3D
from ...operators import LinearOperator
from ...utils.sliding_window import BLEND_MODES, window_locations
from ...utils.validation import check_volume_tensor
from ..meddiff_fm import predict_windowed_noise
from ..pipeline_utils_3d import VolumePipeline, VolumePipelineOutput, decode_normalized_latents
from ..repaint.anatomy import prepare_anatomy
from .intensity_map import as_intensity_map

SKIP_TYPES = ("quad", "uniform")
DATA_STEPS = ("auto", "closed_form", "cg", "first_order")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_DIFFUSERS_RANDN_TENSOR = randn_tensor


def diffpir_timesteps(num_inference_steps: int, skip_type: str = "quad", num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps DiffPIR calls the model at, in order (`main_ddpir.py:327-344`).

    - `"quad"`: `seq = int(sqrt(linspace(0, T², N)))` with the last entry minus one: N calls, dense near t = 0
      (N = 20: 999, 770, 675, ..., 26, 0).
    - `"uniform"`: `seq = i * (T // N)` for `i < N`, then `T - 1`: N + 1 calls (N = 20: 999, 949, ..., 49, 0).

    The visited timestep is `T - 1 - seq[i]`. (The original appends `T - 1` only when `T // N > 1`, so it ends at
    `t = T - N` for `N > T / 2`; here it is appended whenever it is not already last, so every run ends at t = 0.)
    """
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"`skip_type` must be one of {SKIP_TYPES}, got {skip_type!r}.")
    minimum = 2 if skip_type == "quad" else 1
    if not isinstance(num_inference_steps, int) or not minimum <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be an int in [{minimum}, {num_train_timesteps}] for skip_type="
            f"{skip_type!r}, got {num_inference_steps!r}."
        )
    if skip_type == "uniform":
        skip = num_train_timesteps // num_inference_steps
        seq = [i * skip for i in range(num_inference_steps)]
        if seq[-1] != num_train_timesteps - 1:
            seq.append(num_train_timesteps - 1)
    else:
        seq = [int(s) for s in np.sqrt(np.linspace(0, num_train_timesteps**2, num_inference_steps))]
        seq[-1] = seq[-1] - 1
    return [num_train_timesteps - 1 - s for s in seq]


@dataclass
class DiffPIRSchedule:
    """The two noise-schedule tables of the original.

    The float32 "script" tables (`main_ddpir.py:184-190`) drive the start state, `sigmabar`, `rho` and the
    re-noising; the float64 "model" table (guided-diffusion, cast to float32 when used) gives the `x̂₀` coefficients.
    Mixing them up moves the states by about 5e-6.

    Args:
        betas: float32 `beta_t`.
        alphas_cumprod: float32 `alpha_bar_t` (numpy's sequential float32 product, as the original).
        sqrt_alphas_cumprod: float32 `sqrt(alpha_bar_t)`.
        sqrt_1m_alphas_cumprod: float32 `sqrt(1 - alpha_bar_t)`.
        sigmabar: float32 `sqrt(1 - alpha_bar_t) / sqrt(alpha_bar_t)`, the noise level of the prior step.
        model_alphas_cumprod: float64 `alpha_bar_t`.
    """

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_1m_alphas_cumprod: torch.Tensor
    sigmabar: torch.Tensor
    model_alphas_cumprod: torch.Tensor

    @classmethod
    def from_scheduler(cls, scheduler) -> DiffPIRSchedule:
        """Tables of a diffusers scheduler's training schedule.

        A `"linear"` schedule is rebuilt from `beta_start` / `beta_end` as the original does (numpy float32 and
        float64 `linspace`; torch's float32 `linspace` differs by an ulp in places); any other takes
        `scheduler.betas`.
        """
        config = scheduler.config
        steps = config.num_train_timesteps
        if config.get("trained_betas") is None and config.get("beta_schedule") == "linear":
            betas32 = np.linspace(config.beta_start, config.beta_end, steps, dtype=np.float32)
            betas64 = np.linspace(config.beta_start, config.beta_end, steps, dtype=np.float64)
        elif getattr(scheduler, "betas", None) is not None:
            betas32 = scheduler.betas.float().cpu().numpy()
            betas64 = scheduler.betas.double().cpu().numpy()
        else:
            raise ValueError(f"{type(scheduler).__name__} has no `betas`; use a DDPM/DDIM-type scheduler.")
        betas = torch.from_numpy(betas32)
        alphas_cumprod = torch.from_numpy(np.cumprod((1.0 - betas).numpy(), axis=0))
        sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
        sqrt_1m_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            sqrt_alphas_cumprod=sqrt_alphas_cumprod,
            sqrt_1m_alphas_cumprod=sqrt_1m_alphas_cumprod,
            sigmabar=sqrt_1m_alphas_cumprod / sqrt_alphas_cumprod,
            model_alphas_cumprod=torch.from_numpy(np.cumprod(1.0 - betas64, axis=0)),
        )

    def rho(self, lambda_: float, noise_level: float) -> torch.Tensor:
        """`rho_t = lambda * max(0.001, sigma_n)² / sigmabar_t²` for every t (float32, `main_ddpir.py:274-286`)."""
        return lambda_ * max(0.001, noise_level) ** 2 / self.sigmabar**2

    def x0_coefficients(self, timestep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sqrt(1 / abar_t), sqrt(1 / abar_t - 1))` from the float64 table, cast to float32:
        `x̂₀ = c1 x - c2 eps`."""
        alpha_bar = self.model_alphas_cumprod[timestep]
        return torch.sqrt(1.0 / alpha_bar).float(), torch.sqrt(1.0 / alpha_bar - 1).float()


class DiffPIRPipeline(VolumePipeline):
    r"""Restore volumes from linear measurements `y = A x + n` with a diffusion prior (DiffPIR).

    For each timestep `t` of DiffPIR's sequence (and `repeats` times):

    1. prior step: the model's `x̂₀` from the state, clipped to `[-1, 1]`;
    2. data step (not at the last timestep): `x̂₀ ← argmin_x ||A x - y||² + rho_t ||x - x̂₀||²` in data space
       (closed form, conjugate gradients, or the first-order step `x̂₀ - Aᴴ(A x̂₀ - y) / rho_t`), with
       `rho_t = lambda * max(0.001, sigma_n)² / sigmabar_t²`; nothing is clipped after it;
    3. re-noise to the next timestep `t'` with the data-corrected noise `eps = (x - sqrt(abar_t) x̂₀) /
       sqrt(1 - abar_t)`: `x = sqrt(abar_t') x̂₀ + sqrt(1 - zeta) (sqrt(1 - abar_t' - s²) eps + s z_eta) +
       sqrt(zeta) sqrt(1 - abar_t') z_zeta`, `s = eta sqrt(1 - abar_t') / sqrt(1 - abar_t) sqrt(beta_t)`; both
       draws are made at every step (z_eta first);
    4. for repeats: set back to `t` with fresh noise, `x = r x + sqrt(1 - abar_t - r² (1 - abar_t')) z`,
       `r = sqrt(abar_t / abar_t')`.

    The model is still called at the last timestep (t = 0), but that `x̂₀` is not used: the result is the state
    re-noised to t = 0 at the step before (the original's behaviour, which leaves `sqrt(1 - abar_0)` of noise).

    Models:
        - any denoiser called as `unet(sample, t)` (epsilon, sample or v prediction per the scheduler's
          `prediction_type`; a learned-variance output with twice the channels keeps the first half);
        - a [`PatchUNet3DModel`] (pixel space, MedDiff-FM): pass `region`; volumes larger than the window are
          denoised with overlapping windows ([`predict_windowed_noise`]);
        - a latent denoiser with a `vqvae` (3D MedDiffusion): the state and the prior step are latent; the data
          step decodes `x̂₀` (exactly slab by slab above 16³ latent voxels unless the autoencoder's decode mode is
          set), runs on the image, and re-encodes it. That costs one decode and one encode of the
          whole volume per step on top of the denoiser (for the demo autoencoder, more than the denoiser itself),
          and the data step is only as exact as the autoencoder's reconstruction.

    Components:
        unet: The denoiser (see Models).
        scheduler ([`SchedulerMixin`]): Supplies the training noise schedule (`betas`, `num_train_timesteps`,
            `prediction_type`); DiffPIR's own timestep sequence and update replace its `step`.
        vqvae ([`VQModel3D`], optional): Autoencoder of a latent denoiser.

    Configuration (saved in `model_index.json`):
        regions (`list[dict]`, optional): The denoiser's classes, to resolve `region` names (class ids work without).
        window_size (`int` or three ints, optional): A patch denoiser's window, used when a call gives none.
    """

    model_cpu_offload_seq = "unet->vqvae"
    _optional_components = ["vqvae"]
    _callback_tensor_inputs = ["latents", "x0_prior", "x0_data", "renoised"]

    def __init__(
        self,
        unet: PatchUNet3DModel | BiFlowNet3DModel | ModelMixin,
        scheduler: SchedulerMixin,
        vqvae: VQModel3D | None = None,
        regions: list[dict] | None = None,
        window_size: int | Sequence[int] | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vqvae=vqvae)
        registry = RegionRegistry(regions) if regions is not None else None
        window_size = window_size if window_size is None or isinstance(window_size, int) else list(window_size)
        self.register_to_config(
            regions=registry.to_config() if registry is not None else None, window_size=window_size
        )
        self.region_registry = registry

    # ------------------------------------------------------------------------------------------------ requests

    def class_labels(self, region, batch: int, device) -> torch.Tensor | None:
        """`(B,)` class ids of a region name, alias or id (`None` without a region)."""
        if region is None:
            return None
        if self.region_registry is not None:
            class_id = self.region_registry.resolve(region).class_id
        elif isinstance(region, int):
            class_id = region
        else:
            raise ValueError(
                f"Region {region!r} cannot be resolved: this pipeline has no `regions`; pass a class id or build it "
                "with `regions=` (e.g. `DiffPIRPipeline.from_pipe(patch_pipeline)`)."
            )
        return torch.full((batch,), class_id, device=device, dtype=torch.long)

    def check_settings(self, noise_level, lambda_, zeta, eta, repeats, data_step, blend) -> None:
        """`ValueError`s for out-of-range scalar settings and unknown modes (see `__call__`)."""
        for name, value, low, high in (
            ("noise_level", noise_level, 0, None),
            ("zeta", zeta, 0, 1),
            ("eta", eta, 0, 1),
        ):
            if not isinstance(value, int | float) or value < low or (high is not None and value > high):
                bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
                raise ValueError(f"`{name}` must be a number {bounds}, got {value!r}.")
        if not isinstance(lambda_, int | float) or lambda_ <= 0:
            raise ValueError(f"`lambda_` must be a positive number, got {lambda_!r}.")
        if not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"`repeats` must be a positive int, got {repeats!r}.")
        if data_step not in DATA_STEPS:
            raise ValueError(f"`data_step` must be one of {DATA_STEPS}, got {data_step!r}.")
        if blend not in BLEND_MODES:
            raise ValueError(f"`blend` must be one of {BLEND_MODES}, got {blend!r}.")
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"The scheduler's `prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}."
            )

    def check_measurement(self, measurement, operator) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The measurement as a tensor and the `(B, C, D, H, W)` shape of the volumes it measures (`Aᴴ y`), or a
        `ValueError` when it does not fit the operator."""
        if not isinstance(operator, LinearOperator):
            raise ValueError(
                f"`operator` must be a meddiffusers.operators.LinearOperator, got {type(operator).__name__}; "
                "subclass LinearOperator (forward, exact adjoint) to use your own."
            )
        measurement = torch.as_tensor(measurement)
        if not (measurement.is_floating_point() or measurement.is_complex()) or measurement.ndim < 2:
            raise ValueError(
                f"`measurement` must be a batched (B, ...) float or complex tensor, got dtype {measurement.dtype} "
                f"and shape {tuple(measurement.shape)}."
            )
        if not bool(torch.isfinite(measurement).all()):
            raise ValueError("`measurement` contains NaN or infinite values.")
        try:
            image = operator.adjoint(measurement)
            check_volume_tensor(image.real if image.is_complex() else image, "operator.adjoint(measurement)")
            remeasured = tuple(operator.forward(image).shape)
        except (RuntimeError, ValueError) as error:
            raise ValueError(
                f"`measurement` of shape {tuple(measurement.shape)} does not fit {type(operator).__name__}: {error}"
            ) from error
        if remeasured != tuple(measurement.shape):
            raise ValueError(
                f"`measurement` of shape {tuple(measurement.shape)} is not an output of the operator: the volumes it "
                f"measures, {tuple(image.shape)}, map to {remeasured}."
            )
        return measurement, tuple(image.shape)

    def state_shape(self, volume_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the diffusion state: the volume's, or its latent's with a `vqvae`."""
        channels = getattr(getattr(self.unet, "config", None), "in_channels", None)
        if self.vqvae is None:
            if channels is not None and volume_shape[1] != channels:
                raise ValueError(
                    f"The measured volumes have {volume_shape[1]} channel(s) but the denoiser takes {channels}."
                )
            return volume_shape
        factor = self.vqvae.downsample_factor
        multiple = factor * getattr(self.unet, "latent_size_multiple", 1)
        if volume_shape[1] != self.vqvae.config.in_channels or any(side % multiple for side in volume_shape[2:]):
            raise ValueError(
                f"The measured volumes {volume_shape} must have {self.vqvae.config.in_channels} channel(s) and sides "
                f"divisible by {multiple} (autoencoder factor x denoiser multiple); crop or pad them."
            )
        return (volume_shape[0], self.vqvae.config.latent_channels, *(side // factor for side in volume_shape[2:]))

    # ------------------------------------------------------------------------------------------------ steps

    def predict_x0(
        self, sample, timestep: int, schedule: DiffPIRSchedule, class_labels, windowing, anatomy=None
    ) -> torch.Tensor:
        """The prior step: the denoiser's `x̂₀` of the state at `timestep`, clipped to `[-1, 1]` (a
        [`PatchUNet3DModel`] gets each window's crop of `anatomy` when given)."""
        t = torch.tensor(timestep, device=sample.device)
        if isinstance(self.unet, PatchUNet3DModel):
            output = predict_windowed_noise(self.unet, sample, t, class_labels, anatomy=anatomy, **windowing)
        elif class_labels is not None:
            output = self.unet(sample, t, class_labels=class_labels)
        else:
            output = self.unet(sample, t)
        output = output.sample if hasattr(output, "sample") else output[0] if isinstance(output, tuple) else output
        if output.shape[1] == 2 * sample.shape[1]:  # learned variance: DiffPIR reads only the first half
            output = output[:, : sample.shape[1]]
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type == "epsilon":
            c1, c2 = schedule.x0_coefficients(timestep)
            x0 = c1 * sample - c2 * output
        elif prediction_type == "sample":
            x0 = output
        else:
            alpha_bar = schedule.model_alphas_cumprod[timestep]
            x0 = torch.sqrt(alpha_bar).float() * sample - torch.sqrt(1 - alpha_bar).float() * output
        return x0.clamp(-1, 1)

    def data_step(self, x0, measurement, operator, rho, method: str, intensity_map, volume_size) -> torch.Tensor:
        """`argmin_x ||A x - y||² + rho ||x - x̂₀||²` (or the first-order step) in data space, back in model space;
        with a `vqvae`, on the decoded `x̂₀`, re-encoded."""
        image = x0
        if self.vqvae is not None:
            image = decode_normalized_latents(self.vqvae, x0, output_size=volume_size).to(x0.dtype)
        data = image if intensity_map is None else intensity_map.to_data(image)
        if method == "first_order":
            data = operator.gradient_step(data, measurement, rho)
        elif method == "cg":
            data = operator.prox_l2_cg(data, measurement, rho)
        else:
            data = operator.prox_l2(data, measurement, rho)
        data = data.real if data.is_complex() else data
        image = data if intensity_map is None else intensity_map.to_model(data)
        if self.vqvae is None:
            return image
        return self.vqvae.normalize_latents(self.vqvae.encode(image.to(self.vqvae.dtype)).latents).to(x0.dtype)

    def start_state(self, measurement, operator, intensity_map, schedule, t_start, shape, generator, device, dtype):
        """`sqrt(abar_start) x_init + sqrt(1 - abar_start) z` with `x_init` the model-space pseudo-inverse of the
        measurement (mid-grey 0 for operators without `pinv`), encoded with a `vqvae`; one noise draw."""
        if operator.has_pinv:
            guess = operator.pinv(measurement)
            guess = guess.real if guess.is_complex() else guess
            guess = (guess if intensity_map is None else intensity_map.to_model(guess)).clamp(-1, 1).to(dtype)
            if self.vqvae is not None:
                encoded = self.vqvae.encode(guess.to(self.vqvae.dtype)).latents
                guess = self.vqvae.normalize_latents(encoded).to(dtype)
        else:
            guess = torch.zeros(shape, device=device, dtype=dtype)
        noise = draw_noise(shape, generator, device, dtype)
        return schedule.sqrt_alphas_cumprod[t_start] * guess + schedule.sqrt_1m_alphas_cumprod[t_start] * noise

    def device_and_dtype(self, reference: torch.Tensor) -> tuple[torch.device, torch.dtype]:
        """Where and in which dtype to run: the denoiser's, or the measurement's device and float32 for a denoiser
        without parameters (an analytic test network)."""
        if next(self.unet.parameters(), None) is None and next(self.unet.buffers(), None) is None:
            return reference.device, torch.float32
        return self._execution_device, self.unet.dtype

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: LinearOperator,
        noise_level: float,
        lambda_: float = 7.0,
        zeta: float = 0.3,
        eta: float = 0.0,
        num_inference_steps: int = 100,
        skip_type: str = "quad",
        repeats: int = 1,
        data_step: str = "auto",
        start_timestep: int | None = None,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        intensity_map=None,
        region: str | int | None = None,
        window_size: int | Sequence[int] | None = None,
        overlap: float = 0.5,
        blend: str = "constant",
        window_batch_size: int = 1,
        anatomy: torch.Tensor | np.ndarray | None = None,
        affine: np.ndarray | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> VolumePipelineOutput | tuple:
        r"""Restore the volumes behind `measurement`.

        Args:
            measurement: `(B, ...)` measurements `y = A x + n` in data space (sinograms, k-space, thick slices, a
                masked or noisy volume).
            operator: The [`~operators.LinearOperator`] `A` (it fixes the volumes' shape: that of `Aᴴ y`).
            noise_level: `sigma_n` on the `[0, 1]` scale (a fraction of the model range; a std of `2 sigma_n` in
                model units). It sets `rho_t`; 0 is floored at 0.001.
            lambda_: Weight of the prior in `rho_t` (7 for the original's deblurring, 1 for inpainting).
            zeta: Fraction of fresh noise in the re-noising (1: DDPM-like, 0: deterministic DDIM-like).
            eta: DDIM-type stochasticity of the data-corrected noise, in `[0, 1]`.
            num_inference_steps: DiffPIR's `iter_num` N (N model calls for `"quad"`, N + 1 for `"uniform"`, times
                `repeats`).
            skip_type: `"quad"` (dense near t = 0) or `"uniform"` timesteps ([`diffpir_timesteps`]).
            repeats: DiffPIR's `iter_num_U`: passes per timestep, with a set-back to `t` in between.
            data_step: `"closed_form"` (operators with one), `"cg"` (the operator's conjugate-gradient steps),
                `"first_order"` (one gradient step; unstable where `||A||² / rho_t > 2`), or `"auto"` (closed form
                where available, else CG).
            start_timestep: The start noise level (default: the last training timestep, T - 1, as the original);
                model calls above it are skipped.
            latents: The state entering the first model call, instead of the start state (which draws one noise).
            generator: One `torch.Generator` or one per volume: every draw goes through diffusers' `randn_tensor`.
            intensity_map: Model space ↔ data space: `None` (measurements and images in model space `[-1, 1]`), an
                [`HUWindow`] (e.g. `fm_pipe.hu_window("Chest")`), a `(low, high)` pair, or an object with
                `to_model` / `to_data` ([`IntensityMap`]).
            region: Region name or class id for class-conditional denoisers (needed by a [`PatchUNet3DModel`]).
            window_size: Window of a patch denoiser (default: the pipeline's `window_size`, else the whole volume).
            overlap / blend / window_batch_size: Windowing of a patch denoiser ([`predict_windowed_noise`]).
            anatomy: Integer anatomy labels over the whole volume, `(D, H, W)` or `(1 or B, 1, D, H, W)` (0
                background), for a [`PatchUNet3DModel`] built with an `anatomy_encoding`: each window gets its crop.
            affine: `(4, 4)` or `(B, 4, 4)` voxel-to-world matrices for the outputs (default: the region's spacing,
                else the identity).
            output_type: `"np"` / `"pt"` (model space, clipped to `[-1, 1]`), `"latent"` (the final state, in model
                or latent space, unclipped) or `"nifti"` (data space when an `intensity_map` is given).
            return_dict: Return a [`VolumePipelineOutput`] rather than a tuple.
            callback_on_step_end: Called after every model call as `callback(pipe, step, timestep, kwargs)`; may
                return a dict replacing `latents`.
            callback_on_step_end_tensor_inputs: Tensors handed to the callback: `latents` (the state after the call:
                the next model input), `x0_prior` (the clipped `x̂₀`), `x0_data` (after the data step) and `renoised`
                (the state before any set-back).

        Returns:
            [`VolumePipelineOutput`] with the volumes and affines (or a tuple of those and the region names).
        """
        # 1. Check the request before any model runs.
        self.check_output_type(output_type)
        tensor_inputs = self.check_callback_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        self.check_settings(noise_level, lambda_, zeta, eta, repeats, data_step, blend)
        measurement, volume_shape = self.check_measurement(measurement, operator)
        if data_step == "closed_form" and not operator.has_closed_form_prox:
            raise ValueError(
                f"{type(operator).__name__} has no closed-form proximal step; use data_step='cg' or 'auto'."
            )
        method = ("closed_form" if operator.has_closed_form_prox else "cg") if data_step == "auto" else data_step
        intensity_map = as_intensity_map(intensity_map)
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        timesteps = diffpir_timesteps(num_inference_steps, skip_type, num_train_timesteps)
        t_start = num_train_timesteps - 1 if start_timestep is None else start_timestep
        if not isinstance(t_start, int) or not 0 <= t_start < num_train_timesteps:
            raise ValueError(f"`start_timestep` must be an int in [0, {num_train_timesteps}), got {start_timestep!r}.")
        shape = self.state_shape(volume_shape)
        batch = shape[0]
        self.check_generators(generator, batch)
        device, dtype = self.device_and_dtype(measurement)
        if latents is not None:
            check_volume_tensor(latents, "latents")
            if tuple(latents.shape) != shape:
                raise ValueError(f"`latents` must have the state's shape {shape}, got {tuple(latents.shape)}.")
        class_labels = self.class_labels(region, batch, device)
        if isinstance(self.unet, PatchUNet3DModel) and class_labels is None:
            raise ValueError("A PatchUNet3DModel prior needs `region=` (its class conditioning).")
        window_size = self.config.window_size if window_size is None else window_size
        window = tuple(shape[2:]) if window_size is None else window_size
        window_locations(shape[2:], window, overlap)  # validates `window_size` and `overlap`
        windowing = dict(window_size=window, overlap=overlap, blend=blend, window_batch_size=window_batch_size)
        anatomy = prepare_anatomy(self.unet, anatomy, batch, shape[2:], device)
        affines = self.output_affines(affine, region, batch, output_type)
        measurement = measurement.to(device)

        # 2. DiffPIR's timesteps, rho_t, and the state entering the first model call.
        schedule = DiffPIRSchedule.from_scheduler(self.scheduler)
        rhos = schedule.rho(lambda_, noise_level)
        sqrt_abar, sqrt_1m_abar, betas = schedule.sqrt_alphas_cumprod, schedule.sqrt_1m_alphas_cumprod, schedule.betas
        if latents is None:
            latents = self.start_state(
                measurement, operator, intensity_map, schedule, t_start, shape, generator, device, dtype
            )
        latents = latents.to(device=device, dtype=dtype)
        # One entry per model call: (t, the next timestep t' or None at the last one, the repeat index u).
        calls = [
            (t, timesteps[i + 1] if i + 1 < len(timesteps) else None, u)
            for i, t in enumerate(timesteps)
            if t <= t_start
            for u in range(repeats)
        ]

        # 3. Restore: prior step, data step, re-noise (and set back between repeats).
        self._num_timesteps = len(calls)
        self._interrupt = False
        with self.progress_bar(total=len(calls)) as progress_bar:
            for step, (t, t_prev, u) in enumerate(calls):
                if self.interrupt:
                    break
                x0_prior = self.predict_x0(latents, t, schedule, class_labels, windowing, anatomy)
                if t_prev is None:  # last timestep: the model is called, its x̂₀ is not used
                    x0_data, renoised = x0_prior, latents
                else:
                    x0_data = self.data_step(
                        x0_prior, measurement, operator, rhos[t], method, intensity_map, volume_shape[2:]
                    )
                    eps = (latents - sqrt_abar[t] * x0_data) / sqrt_1m_abar[t]
                    eta_sigma = eta * sqrt_1m_abar[t_prev] / sqrt_1m_abar[t] * torch.sqrt(betas[t])
                    z_eta = draw_noise(shape, generator, device, dtype)
                    z_zeta = draw_noise(shape, generator, device, dtype)
                    kept = torch.sqrt(sqrt_1m_abar[t_prev] ** 2 - eta_sigma**2)
                    renoised = (
                        sqrt_abar[t_prev] * x0_data
                        + np.sqrt(1 - zeta) * (kept * eps + eta_sigma * z_eta)
                        + np.sqrt(zeta) * sqrt_1m_abar[t_prev] * z_zeta
                    )
                latents = renoised
                if u < repeats - 1 and t_prev is not None:  # set back to t for the next pass
                    ratio = sqrt_abar[t] / sqrt_abar[t_prev]
                    spread = torch.sqrt(sqrt_1m_abar[t] ** 2 - ratio**2 * sqrt_1m_abar[t_prev] ** 2)
                    latents = ratio * renoised + spread * draw_noise(shape, generator, device, dtype)
                if callback_on_step_end is not None:
                    available = {"latents": latents, "x0_prior": x0_prior, "x0_data": x0_data, "renoised": renoised}
                    callback_kwargs = {name: available[name] for name in tensor_inputs}
                    callback_outputs = callback_on_step_end(self, step, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 4. The final state in the requested form.
        return self.package_output(latents, volume_shape, intensity_map, affines, region, output_type, return_dict)

    def package_output(self, latents, volume_shape, intensity_map, affines, region, output_type, return_dict):
        """The final state as is (`"latent"`), else decoded (with a `vqvae`), clipped to `[-1, 1]` and, for
        `"nifti"`, mapped to data space; with affines and region names."""
        volumes = latents
        if output_type != "latent":
            if self.vqvae is not None:
                volumes = decode_normalized_latents(self.vqvae, latents, output_size=volume_shape[2:])
            volumes = volumes.float().clamp(-1, 1).cpu()
            if output_type == "nifti" and intensity_map is not None:
                volumes = intensity_map.to_data(volumes)
        volumes = self.postprocess(volumes, affines, output_type)
        names = None
        if region is not None and self.region_registry is not None:
            names = [self.region_registry.resolve(region).name] * len(affines)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (volumes, affines, names)
        return VolumePipelineOutput(volumes=volumes, affines=affines, regions=names)

    def output_affines(self, affine, region, batch: int, output_type: str) -> np.ndarray:
        """`(B, 4, 4)` affines: the given ones, else the region's spacing, else the identity (latent voxels are
        `vqvae` factor times larger)."""
        if affine is not None:
            affine = np.asarray(affine, dtype=np.float64)
            if affine.shape not in ((4, 4), (batch, 4, 4)):
                raise ValueError(f"`affine` must be (4, 4) or ({batch}, 4, 4), got {affine.shape}.")
            affines = np.broadcast_to(affine, (batch, 4, 4)).copy()
        else:
            spacing = None
            if region is not None and self.region_registry is not None:
                spacing = self.region_registry.resolve(region).spacing
            affines = np.stack([affine_from_tensor_spacing(spacing or (1.0, 1.0, 1.0))] * batch)
        if output_type == "latent" and self.vqvae is not None:
            affines[:, :3, :3] *= self.vqvae.downsample_factor
        return affines


def draw_noise(shape, generator, device, dtype) -> torch.Tensor:
    """One standard normal draw of `shape` through diffusers' `randn_tensor`, looked up when called: replacing
    `diffusers.utils.torch_utils.randn_tensor` or this module's `randn_tensor` (to replay recorded noise) takes
    effect."""
    draw = randn_tensor if randn_tensor is not _DIFFUSERS_RANDN_TENSOR else torch_utils.randn_tensor
    return draw(shape, generator=generator, device=device, dtype=dtype)
