"""The noise schedule 3D MedDiffusion was trained with."""

from __future__ import annotations

import math

import numpy as np


def meddiffusion_cosine_betas(
    num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.9999
) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal) as 3D MedDiffusion computes it: in float64, betas clipped to `max_beta`.

    `alpha_bar(t) = cos²(((t / T) + s) / (1 + s) · π / 2) / alpha_bar(0)` and `beta_t = 1 - alpha_bar(t + 1) /
    alpha_bar(t)`. Only the last beta reaches the clip (1.0 becomes 0.9999); diffusers' `squaredcos_cap_v2` clips at
    0.999 instead, which is why meddiffusers passes these betas to schedulers as `trained_betas`.

    Returns:
        float64 array of `num_train_timesteps` betas.
    """
    steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi * 0.5) ** 2
    alpha_bar = alpha_bar / alpha_bar[0]
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return np.clip(betas, 0, max_beta)
