"""GEM-3D's default scheduler: diffusers' DDIMScheduler against the original DDIM sampler's tables and updates."""

import pytest
import torch

from meddiffusers.pipelines.gem3d import gem3d_ddim_scheduler, original_ddim_timesteps, set_original_timesteps
from tests.pipelines.gem3d.conftest import CONFIG

TABLE_TOL = dict(atol=1e-7, rtol=1e-6)  # the fixture's tolerance for the schedule tables


def test_schedule_buffers_match_the_checkpoints(reference):
    scheduler = gem3d_ddim_scheduler()
    torch.testing.assert_close(scheduler.betas, reference["sched_betas"], **TABLE_TOL)
    torch.testing.assert_close(scheduler.alphas_cumprod, reference["sched_alphas_cumprod"], **TABLE_TOL)


@pytest.mark.parametrize("prefix, steps", [("ddim", 10), ("anch_fwd", 5), ("anch_rev", 5), ("sddim", 5)])
def test_timesteps_alphas_and_sigma_per_step_match_the_original(reference, prefix, steps):
    scheduler = gem3d_ddim_scheduler()
    scheduler.set_timesteps(steps)
    r = {key[len(prefix) + 1 :]: value for key, value in reference.items() if key.startswith(prefix + "_")}
    assert scheduler.timesteps.tolist() == r["timesteps_visited"].tolist()
    ratio = scheduler.config.num_train_timesteps // steps
    a_t = torch.stack([scheduler.alphas_cumprod[t] for t in scheduler.timesteps])
    a_prev = torch.stack(
        [
            scheduler.alphas_cumprod[t - ratio] if t >= ratio else scheduler.final_alpha_cumprod
            for t in scheduler.timesteps
        ]
    )
    sigma = torch.stack([scheduler._get_variance(t, t - ratio) ** 0.5 for t in scheduler.timesteps])
    torch.testing.assert_close(a_t, r["a_t"], **TABLE_TOL)
    torch.testing.assert_close(a_prev, r["a_prev"], **TABLE_TOL)
    # diffusers' float32 cumulative product differs from the original's float64 one by up to 4.8e-7.
    torch.testing.assert_close((1 - a_t).sqrt(), r["sqrt_one_minus_a_t"], atol=6e-7, rtol=1e-6)
    # The original computes sigma in float64; diffusers' float32 value is within a few 1e-7 of it.
    torch.testing.assert_close(sigma, r["sigma_t"], atol=5e-7, rtol=1e-6)
    if "sigma_t_f64" in r:
        assert (sigma.double() - r["sigma_t_f64"]).abs().max() < 5e-7


def test_ddim_step_with_eta_1_equals_the_recorded_update(reference):
    r = reference
    scheduler = gem3d_ddim_scheduler()
    scheduler.set_timesteps(10)
    for i, t in enumerate(scheduler.timesteps):
        out = scheduler.step(
            r["ddim_steps_eps"][i], t, r["ddim_steps_x_before"][i], eta=1.0, variance_noise=r["ddim_steps_noise"][i]
        )
        torch.testing.assert_close(out.pred_original_sample, r["ddim_steps_pred_x0"][i], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.prev_sample, r["ddim_steps_x_after"][i], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("steps", sorted(int(n) for n in CONFIG["make_ddim_timesteps_uniform_1000"]))
def test_original_step_count_reproduces_the_original_timesteps(steps):
    expected = CONFIG["make_ddim_timesteps_uniform_1000"][str(steps)]
    assert original_ddim_timesteps(steps).tolist() == expected[::-1]
    scheduler = gem3d_ddim_scheduler()
    set_original_timesteps(scheduler, steps)
    assert scheduler.timesteps.tolist() == expected[::-1]
    # diffusers' own count: exactly `steps` timesteps; the original visits more when `steps` does not divide 1000.
    plain = gem3d_ddim_scheduler()
    plain.set_timesteps(steps)
    assert len(plain.timesteps) == steps and len(expected) == -(-1000 // (1000 // steps))
    assert set(plain.timesteps.tolist()) <= set(expected)


def test_original_step_count_steps_to_the_next_visited_timestep():
    # n = 6 visits 997, 831, ..., 1: each DDIM step must land on the next one (and on alphas_cumprod[0] at the end).
    scheduler = gem3d_ddim_scheduler()
    set_original_timesteps(scheduler, 6)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == [997, 831, 665, 499, 333, 167, 1]
    x = torch.ones(1, 4, 2, 2)
    for i, t in enumerate(timesteps):
        # With eps = 0 and eta = 0, x_prev = sqrt(a_prev / a_t) * x reveals the alpha stepped to.
        prev = scheduler.step(torch.zeros_like(x), t, x, eta=0.0).prev_sample
        a_prev = scheduler.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else scheduler.alphas_cumprod[0]
        expected = (a_prev / scheduler.alphas_cumprod[t]).sqrt()
        torch.testing.assert_close(prev, x * expected, atol=1e-6, rtol=1e-6)


def test_original_step_count_needs_a_leading_ddim_scheduler():
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(ValueError, match="DDIMScheduler"):
        set_original_timesteps(DPMSolverMultistepScheduler(), 10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        original_ddim_timesteps(0)
