"""The respaced DDPM step of RePaint: diffusers' `DDPMScheduler` with float64 tables, the caller's noise and undo."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

VARIANCE_TYPES = ("fixed_small", "learned_range")


class RePaintDDPMScheduler(DDPMScheduler):
    """[`DDPMScheduler`] with what RePaint (andreas128/RePaint, guided-diffusion respacing) needs on top.

    The maths of a reverse step is `DDPMScheduler.step`'s: with `timestep_spacing="linspace"` the timesteps are
    guided-diffusion's respaced `round(k (T - 1) / (N - 1))`, the step from `t` to the next timestep uses the respaced
    `beta = 1 - alpha_bar_t / alpha_bar_prev`, the clipped `x0` gives the posterior mean, and the variance is the
    posterior one (`"fixed_small"`) or the learned-range interpolation towards `log beta` (`"learned_range"`, the
    model's second half of channels). The network is called with these timesteps, the original 1000-step ones. Three
    things are added, because no configuration of `DDPMScheduler` expresses them:

    - **float64 tables.** `alphas_cumprod` is computed and kept in float64 (coefficients are cast to the sample's
      dtype when used), as guided-diffusion does. The float32 tables of `DDPMScheduler` compute
      `1 - alpha_bar_t / alpha_bar_prev` with cancellation near `t = 0`: on the `repaint_tiny` fixture that moves the
      states by 2.7e-5, against 2.3e-6 with float64 tables.
    - **the caller's noise.** `step(..., variance_noise=noise)` adds the given draw instead of drawing one: RePaint
      draws the sampling noise *before* it re-injects the known region (and at the last step too, unused).
    - **undo.** [`undo_step`] takes a sample back up one respaced step, `sqrt(1 - beta) x + sqrt(beta) noise`.

    Every other setting is `DDPMScheduler`'s; the defaults are RePaint's (linear betas 1e-4 to 0.02 over 1000 steps,
    `timestep_spacing="linspace"`, `clip_sample=True`). `DDPMScheduler.from_config(this.config)` and back keep the
    schedule. `variance_type` must be `"fixed_small"` or `"learned_range"`.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"`variance_type` must be one of {VARIANCE_TYPES} for RePaint, got {variance_type!r}.")
        super().__init__(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, variance_type=variance_type,
            clip_sample=clip_sample, prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio, clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value, timestep_spacing=timestep_spacing, steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )  # fmt: skip
        self.betas = self._float64_betas()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)

    def _float64_betas(self) -> torch.Tensor:
        """The betas in float64, from their definition where it is closed-form (else the float32 ones, widened)."""
        config = self.config
        if config.trained_betas is not None:
            return torch.from_numpy(np.asarray(config.trained_betas, dtype=np.float64))
        if not config.rescale_betas_zero_snr and config.beta_schedule in ("linear", "scaled_linear"):
            power = 1.0 if config.beta_schedule == "linear" else 0.5
            start, end = config.beta_start**power, config.beta_end**power
            betas = np.linspace(start, end, config.num_train_timesteps, dtype=np.float64) ** (1 / power)
            return torch.from_numpy(betas)
        return self.betas.double()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """One reverse step from `timestep` to the next timestep of the schedule (`DDPMScheduler.step`'s maths).

        Args:
            model_output: The model's noise (or `x0`, `v`) prediction; with `"learned_range"` it may carry the
                variance as a second half of channels.
            timestep: The current timestep (one of `self.timesteps`).
            sample: The current sample.
            generator: Draws the noise when `variance_noise` is not given.
            variance_noise: Noise to add, scaled by the step's standard deviation, instead of drawing it (it is not
                used at `timestep = 0`, where no noise is added).
            return_dict: Return a [`DDPMSchedulerOutput`] rather than a tuple.
        """
        if variance_noise is None:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        t = timestep
        prev_t = self.previous_timestep(t)
        predicted_variance = None
        if model_output.shape[1] == 2 * sample.shape[1] and self.variance_type == "learned_range":
            model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        beta_prod_t, beta_prod_t_prev = 1 - alpha_prod_t, 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        elif prediction_type == "sample":
            pred_original_sample = model_output
        elif prediction_type == "v_prediction":
            pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        else:
            raise ValueError(
                f"`prediction_type` must be 'epsilon', 'sample' or 'v_prediction', got {prediction_type!r}."
            )
        if self.config.thresholding:
            pred_original_sample = self._threshold_sample(pred_original_sample)
        elif self.config.clip_sample:
            bound = self.config.clip_sample_range
            pred_original_sample = pred_original_sample.clamp(-bound, bound)

        # The posterior mean q(x_prev | x_t, x0).
        pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        if t > 0:
            variance = self._get_variance(t, predicted_variance=predicted_variance)
            std = torch.exp(0.5 * variance) if self.variance_type == "learned_range" else variance ** (0.5)
            pred_prev_sample = pred_prev_sample + std * variance_noise.to(sample.device, sample.dtype)

        if not return_dict:
            return (pred_prev_sample, pred_original_sample)
        return DDPMSchedulerOutput(prev_sample=pred_prev_sample, pred_original_sample=pred_original_sample)

    def undo_step(self, sample: torch.Tensor, timestep: int | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Take a sample at `previous_timestep(timestep)` back up to `timestep`: one forward step of the schedule.

        `sqrt(1 - beta) sample + sqrt(beta) noise` with the respaced `beta = 1 - alpha_bar_t / alpha_bar_prev` of
        the step that [`step`] makes from `timestep` (RePaint's "undo").

        Args:
            sample: The sample at the lower timestep.
            timestep: The timestep to return to (not the lowest one of the schedule).
            noise: Standard normal noise of the sample's shape.
        """
        prev_t = self.previous_timestep(timestep)
        if prev_t < 0:
            raise ValueError(
                f"Cannot undo a step to timestep {int(timestep)}: no timestep of the schedule is below it."
            )
        beta = 1 - self.alphas_cumprod[timestep] / self.alphas_cumprod[prev_t]
        beta = beta.to(sample.dtype)
        return (1 - beta).sqrt() * sample + beta.sqrt() * noise.to(sample.device, sample.dtype)
