"""GEM-3D's default sampler as diffusers' `DDIMScheduler`, and the original's count of DDIM steps.

The original samples with LDM's `DDIMSampler` at `eta = 1`: timesteps `make_ddim_timesteps("uniform", n, 1000)` =
`arange(0, 1000, 1000 // n) + 1`, `alpha_prev` of the last step `alphas_cumprod[0]`, no clipping. diffusers'
`DDIMScheduler` with `timestep_spacing="leading"`, `steps_offset=1`, `set_alpha_to_one=False` and
`clip_sample=False` computes the same update; its `sigma` is computed in float32 where the original uses float64
(they differ by about 1e-7).

One difference remains: when `n` does not divide 1000, the original visits `ceil(1000 / (1000 // n))` steps, more
than `n` (`n = 6` visits 7, `n = 300` visits 334), while `DDIMScheduler` visits exactly `n`. The pipeline keeps
diffusers' meaning of `num_inference_steps` by default; [`original_ddim_timesteps`] (the pipeline's
`original_step_count=True`) gives the original's list, which `DDIMScheduler.step` handles unchanged because its
step size `1000 // n` is the same.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDIMScheduler

GEM3D_DDIM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def gem3d_ddim_scheduler(**overrides) -> DDIMScheduler:
    """diffusers' `DDIMScheduler` configured as GEM-3D's original sampler (`overrides` replace config entries)."""
    return DDIMScheduler(**{**GEM3D_DDIM_CONFIG, **overrides})


def original_ddim_timesteps(
    num_inference_steps: int, num_train_timesteps: int = 1000, steps_offset: int = 1
) -> torch.Tensor:
    """The timesteps the original DDIM sampler visits for `ddim_steps = num_inference_steps`, in visit order.

    `arange(0, T, T // n) + steps_offset`, descending: more than `n` entries when `n` does not divide `T`.
    """
    if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps` must be an int in [1, {num_train_timesteps}], got {num_inference_steps!r}."
        )
    steps = np.arange(0, num_train_timesteps, num_train_timesteps // num_inference_steps) + steps_offset
    return torch.from_numpy(steps[::-1].copy()).long()


def set_original_timesteps(scheduler, num_inference_steps: int, device=None) -> None:
    """`scheduler.set_timesteps(n)`, then the original's visited timesteps (see the module docstring).

    Only for `DDIMScheduler`-type schedulers with leading spacing, whose `step` derives the previous timestep from
    `T // num_inference_steps`.
    """
    config = scheduler.config
    if not isinstance(scheduler, DDIMScheduler) or config.get("timestep_spacing") != "leading":
        raise ValueError(
            "`original_step_count=True` needs a DDIMScheduler with timestep_spacing='leading' (the original's "
            f"sampler); got {type(scheduler).__name__} with timestep_spacing={config.get('timestep_spacing')!r}."
        )
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = original_ddim_timesteps(num_inference_steps, config.num_train_timesteps, config.steps_offset)
    scheduler.timesteps = timesteps.to(device) if device is not None else timesteps
