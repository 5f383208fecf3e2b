"""The original noise schedule and the original DDIM timestep grid, without a denoiser."""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from safetensors.torch import load_file

from meddiffusers.schedulers import MedDiffusionDDIMScheduler, meddiffusion_cosine_betas
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURES / "biflownet_tiny" / "inputs_outputs.safetensors")


def test_cosine_betas_match_the_original_float64_schedule(ref):
    betas = meddiffusion_cosine_betas(1000)
    assert betas.dtype == np.float64 and betas[-1] == pytest.approx(0.9999)
    np.testing.assert_array_equal(betas.astype(np.float32), ref["schedule_betas"].numpy())
    np.testing.assert_array_equal(np.cumprod(1 - betas).astype(np.float32), ref["schedule_alphas_cumprod"].numpy())
    np.testing.assert_array_equal(meddiffusion_cosine_betas(20).astype(np.float32), ref["ddpm20_schedule_betas"])


def test_ddim_grid_is_the_original_one(ref):
    scheduler = MedDiffusionDDIMScheduler()
    scheduler.set_timesteps(100)
    assert torch.equal(scheduler.timesteps, ref["ddim_timesteps"])
    assert scheduler.previous_timestep(999) == 988 and scheduler.previous_timestep(0) == 0
    torch.testing.assert_close(scheduler.alphas_cumprod, ref["schedule_alphas_cumprod"], atol=0, rtol=0)


def test_ddim_step_uses_raw_noise_and_alpha_bar_zero_at_the_end():
    scheduler = MedDiffusionDDIMScheduler()
    scheduler.set_timesteps(10)
    sample, eps = torch.full((1, 1, 2, 2, 2), 3.0), torch.full((1, 1, 2, 2, 2), -1.0)
    out = scheduler.step(eps, 0, sample)
    alpha0 = scheduler.alphas_cumprod[0]
    x0 = (sample / alpha0.sqrt() - (1 / alpha0 - 1).sqrt() * eps).clamp(-1, 1)
    torch.testing.assert_close(out.pred_original_sample, x0)
    torch.testing.assert_close(out.prev_sample, alpha0.sqrt() * x0 + (1 - alpha0).sqrt() * eps)
    with pytest.raises(ValueError, match="not on the sampling grid"):
        scheduler.step(eps, 5, sample)


def test_save_load_and_any_diffusers_scheduler_gets_the_same_schedule(tmp_path):
    scheduler = MedDiffusionDDIMScheduler()
    scheduler.save_pretrained(tmp_path)
    reloaded = MedDiffusionDDIMScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(reloaded.alphas_cumprod, scheduler.alphas_cumprod)
    for cls in (
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
    ):
        other = cls.from_config(scheduler.config)
        torch.testing.assert_close(other.alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=0)


def test_add_noise_matches_original_q_sample(ref):
    scheduler = MedDiffusionDDIMScheduler()
    noisy = scheduler.add_noise(ref["qs_x_start"], ref["qs_noise"], ref["qs_t"])
    torch.testing.assert_close(noisy, ref["qs_x_noisy"], atol=1e-6, rtol=1e-6)


def test_configs_saved_by_older_versions_load_and_swap_without_warnings(tmp_path):
    import json
    import logging

    import diffusers

    MedDiffusionDDIMScheduler().save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    legacy = json.loads(path.read_text())
    for key in MedDiffusionDDIMScheduler.SOLVER_SETTINGS:
        legacy.pop(key)
    legacy["use_clipped_model_output"] = False  # an init argument before it became a `step` argument
    path.write_text(json.dumps(legacy))
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = diffusers.utils.logging.get_logger("diffusers.configuration_utils")
    logger.addHandler(handler)
    try:
        scheduler = MedDiffusionDDIMScheduler.from_pretrained(tmp_path)
        euler = EulerDiscreteScheduler.from_config(scheduler.config)
    finally:
        logger.removeHandler(handler)
    assert not messages
    assert euler.config.timestep_spacing == "leading"
    assert "use_clipped_model_output" not in scheduler.config


def test_solver_settings_survive_a_chain_of_from_config():
    scheduler = MedDiffusionDDIMScheduler()
    for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler, DDPMScheduler):
        scheduler = cls.from_config(scheduler.config)
        assert scheduler.config.timestep_spacing == "leading"
        assert scheduler.config.thresholding is True and scheduler.config.sample_max_value == 1.0
