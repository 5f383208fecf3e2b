"""Short scheduler names for the command line and for quick swaps in code."""

from __future__ import annotations

import diffusers

from .scheduling_meddiffusion_ddim import MedDiffusionDDIMScheduler

#: name -> (scheduler class, config overrides). Every class is built with `from_config`, so it inherits the exact
#: betas and the solver settings that `MedDiffusionDDIMScheduler` records (`timestep_spacing="leading"`,
#: `thresholding=True`, `sample_max_value=1.0`); the overrides only choose a variant of the method.
SCHEDULERS = {
    "ddim": (MedDiffusionDDIMScheduler, {}),
    "ddpm": (diffusers.DDPMScheduler, {"variance_type": "fixed_small", "clip_sample": True}),
    "diffusers-ddim": (diffusers.DDIMScheduler, {"clip_sample": True, "set_alpha_to_one": False}),
    "dpm++": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpm++-singlestep": (diffusers.DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
    "deis": (diffusers.DEISMultistepScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler-ancestral": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "kdpm2": (diffusers.KDPM2DiscreteScheduler, {}),
}


def scheduler_from_name(name: str, config):
    """Build the scheduler called `name` (see `SCHEDULERS`) from another scheduler's `config` (same noise schedule).

    `"ddim"` is the original 3D MedDiffusion DDIM sampler and `"ddpm"` its ancestral sampler (fixed-small variance,
    `x0` clipped); the others are diffusers' solvers on the same betas.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)
