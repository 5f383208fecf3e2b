"""DDIM sampling exactly as 3D MedDiffusion's reference sampler does it."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from .schedule import meddiffusion_cosine_betas


class MedDiffusionDDIMScheduler(SchedulerMixin, ConfigMixin):
    """Deterministic DDIM with the timestep grid and update of the 3D MedDiffusion reference sampler.

    Why not diffusers' `DDIMScheduler`: no configuration of it gives the same maths. The reference

    - visits `floor(linspace(0, T - 1, N))` in reverse (999, 988, 978, ..., 10, 0 for N = 100), and each step goes to
      the *next timestep in that list*, not to `t - T // N`;
    - makes the last step (t = 0) go to `alpha_bar_0` rather than 1;
    - clips the predicted `x0` to `[-clip_sample_range, clip_sample_range]` but keeps the model's raw noise prediction
      in the direction term (diffusers re-derives the noise from the clipped `x0`);
    - derives every coefficient from a float64 schedule.

    `step(..., use_clipped_model_output=True)` re-derives the noise from the clipped `x0` instead, and `eta > 0` adds
    the standard DDIM stochasticity (`eta=1` is the original stochastic sampler); the pipelines pass `eta` through.

    The configuration stores the exact betas as `trained_betas`, so `OtherScheduler.from_config(this.config)` gives
    any diffusers scheduler the same noise schedule. It also records [`SOLVER_SETTINGS`] for those schedulers (not
    used by this one, as `clip_sample` in a PNDM config is kept for DDIM): the schedule ends at
    `alpha_bar_999 ~ 2.4e-10`, so a solver that evaluates the model at t = 999 without bounding `x0` multiplies the
    noise-prediction error by about 64,000. `timestep_spacing="leading"` makes the diffusers solvers start one grid
    step below 999 and `thresholding=True` with `sample_max_value=1.0` clips their `x0` to `[-1, 1]` as this
    scheduler does.

    Args:
        num_train_timesteps: Diffusion steps the model was trained with.
        trained_betas: Betas to use; by default 3D MedDiffusion's float64 cosine schedule.
        beta_schedule: Recorded for other schedulers' `from_config` when `trained_betas` is absent.
        clip_sample: Clip the predicted `x0`.
        clip_sample_range: Bound of that clipping.
        prediction_type: `"epsilon"`, `"sample"` or `"v_prediction"`.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    #: Configuration recorded for the diffusers schedulers built with `from_config` (see the class docstring).
    SOLVER_SETTINGS = {"timestep_spacing": "leading", "thresholding": True, "sample_max_value": 1.0}

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        trained_betas: list[float] | np.ndarray | None = None,
        beta_schedule: str = "squaredcos_cap_v2",
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(
                f"Unknown prediction_type {prediction_type!r}; use 'epsilon', 'sample' or 'v_prediction'."
            )
        if trained_betas is None:
            betas = meddiffusion_cosine_betas(num_train_timesteps)
            # Record the exact betas so that any scheduler built with `from_config` uses the same schedule.
            used_defaults = [k for k in self.config.get("_use_default_values", []) if k != "trained_betas"]
            self.register_to_config(trained_betas=betas.tolist(), _use_default_values=used_defaults)
        # Settings for other schedulers; `from_config` then restores any saved values over these defaults.
        self.register_to_config(**self.SOLVER_SETTINGS)
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float64)
            if betas.shape != (num_train_timesteps,):
                raise ValueError(f"`trained_betas` must hold {num_train_timesteps} values, got {betas.shape}.")
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.betas = torch.from_numpy(betas).float()
        self.alphas_cumprod = torch.from_numpy(alphas_cumprod).float()
        self._sqrt_recip_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / alphas_cumprod)).float()
        self._sqrt_recipm1_alphas_cumprod = torch.from_numpy(np.sqrt(1.0 / alphas_cumprod - 1)).float()
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps)[::-1].copy())
        self._previous = {}

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """`ConfigMixin.from_config`, refusing sampling arguments that belong to `step` rather than the config."""
        misplaced = sorted(set(kwargs) & {"eta", "use_clipped_model_output", "generator"})
        if misplaced:
            raise TypeError(
                f"{misplaced} are sampling arguments, not configuration: pass them to the pipeline call "
                "(`pipe(..., eta=1.0)`) or to `scheduler.step(...)`."
            )
        if isinstance(config, dict) and "use_clipped_model_output" in config:
            # Saved as configuration by earlier meddiffusers; now a `step` argument, which other schedulers reject.
            config = {key: value for key, value in config.items() if key != "use_clipped_model_output"}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """Identity: DDIM needs no input scaling (kept for scheduler interchangeability)."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Visit `floor(linspace(0, T - 1, num_inference_steps))` from the largest timestep down to 0."""
        train_steps = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= train_steps:
            raise ValueError(f"`num_inference_steps` must be between 1 and {train_steps}, got {num_inference_steps}.")
        grid = np.linspace(0, train_steps - 1, num_inference_steps).astype(np.int64)[::-1].copy()
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(grid).to(device)
        self._previous = {int(t): int(prev) for t, prev in zip(grid, [*grid[1:], 0])}

    def previous_timestep(self, timestep) -> int:
        """The timestep the step from `timestep` lands on (the next one in the grid; 0 after 0)."""
        timestep = int(timestep)
        if timestep not in self._previous:
            raise ValueError(
                f"Timestep {timestep} is not on the sampling grid; call `set_timesteps` and use `scheduler.timesteps`."
            )
        return self._previous[timestep]

    def _coefficient(self, values: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        return values[timestep].to(device=sample.device, dtype=sample.dtype)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDIMSchedulerOutput | tuple:
        """One DDIM update from `timestep` to the next timestep of the grid.

        Args:
            model_output: The denoiser's prediction (noise, sample or velocity, per `prediction_type`).
            timestep: Current timestep, one of `self.timesteps`.
            sample: Current noisy sample.
            eta: Weight of the stochastic term (0: deterministic DDIM, 1: the original stochastic sampler).
            use_clipped_model_output: Re-derive the noise from the clipped `x0` (diffusers' DDIM behaviour).
            generator: Random generator for the stochastic term.
            return_dict: Return a `DDIMSchedulerOutput` rather than a tuple.

        Returns:
            The previous sample and the (clipped) predicted `x0`.
        """
        if eta < 0:
            raise ValueError(f"`eta` must be >= 0, got {eta}.")
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        alpha_t = self._coefficient(self.alphas_cumprod, t, sample)
        alpha_prev = self._coefficient(self.alphas_cumprod, prev_t, sample)
        prediction = self.config.prediction_type
        if prediction == "epsilon":
            epsilon = model_output
            x0 = self._coefficient(self._sqrt_recip_alphas_cumprod, t, sample) * sample
            x0 = x0 - self._coefficient(self._sqrt_recipm1_alphas_cumprod, t, sample) * epsilon
        elif prediction == "sample":
            x0 = model_output
            epsilon = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
        else:
            x0 = alpha_t.sqrt() * sample - (1 - alpha_t).sqrt() * model_output
            epsilon = alpha_t.sqrt() * model_output + (1 - alpha_t).sqrt() * sample
        if self.config.clip_sample:
            bound = self.config.clip_sample_range
            x0 = x0.clamp(-bound, bound)
            if use_clipped_model_output:
                epsilon = (sample - alpha_t.sqrt() * x0) / (1 - alpha_t).sqrt()
        sigma = torch.zeros_like(alpha_t)
        if eta > 0 and prev_t != t:
            sigma = eta * ((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)).sqrt()
        prev_sample = alpha_prev.sqrt() * x0 + (1 - alpha_prev - sigma**2).clamp(min=0).sqrt() * epsilon
        if eta > 0 and prev_t != t:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            prev_sample = prev_sample + sigma * noise
        if not return_dict:
            return (prev_sample, x0)
        return DDIMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Forward process `sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise` (training)."""
        alphas = self.alphas_cumprod.to(original_samples.device)[timesteps.to(original_samples.device)]
        alphas = alphas.to(original_samples.dtype).reshape(-1, *([1] * (original_samples.ndim - 1)))
        return alphas.sqrt() * original_samples + (1 - alphas).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
