"""Any diffusers scheduler built from the pipeline's config gives a good sample with the bundled demo model.

"Good" is measured against the original DDIM sampler at 100 steps from the same initial noise: the deterministic
solvers must reproduce its volume (correlation >= 0.9 at 25 steps); the stochastic ones must stay in the model's
intensity range with the same overall statistics.
"""

import logging

import diffusers
import numpy as np
import pytest
import torch

from meddiffusers import MedDiffusionDDIMScheduler, MedDiffusionPipeline
from meddiffusers.demo import demo_model_path
from meddiffusers.schedulers import SCHEDULERS, scheduler_from_name

ODE_SOLVERS = [
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
]
STOCHASTIC = ["DDPMScheduler", "EulerAncestralDiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]
# The eleven the issue tracker asked for, in a chain: each built from the previous one's saved config.
CHAIN = [
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "DEISMultistepScheduler",
]
REGION = "MRBrain"


def correlation(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


class ConfigWarnings(logging.Handler):
    """Collects diffusers' "config attributes ... are not expected" warnings."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def demo():
    pipe = MedDiffusionPipeline.from_pretrained(demo_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def noise(demo):
    size = demo.latent_size(demo.get_region(REGION).volume_size)
    shape = (1, demo.unet.config.in_channels, *size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(demo, noise):
    """The original DDIM sampler, 100 steps."""
    demo.scheduler = MedDiffusionDDIMScheduler.from_config(demo.scheduler.config)
    return demo(REGION, num_inference_steps=100, latents=noise).volumes


def sample_with(demo, scheduler, noise, steps=25, seed=1, **kwargs):
    original = demo.scheduler
    demo.scheduler = scheduler
    try:
        generator = torch.Generator().manual_seed(seed)
        return demo(REGION, num_inference_steps=steps, latents=noise, generator=generator, **kwargs).volumes
    finally:
        demo.scheduler = original


def scheduler_class(name):
    if name == "LMSDiscreteScheduler":
        pytest.importorskip("scipy", reason="diffusers' LMSDiscreteScheduler needs scipy")
    return getattr(diffusers, name)


@pytest.mark.parametrize("name", ODE_SOLVERS)
def test_deterministic_solvers_from_config_reproduce_ddim_100(demo, noise, reference, name):
    scheduler = scheduler_class(name).from_config(demo.scheduler.config)
    volume = sample_with(demo, scheduler, noise)
    assert correlation(volume, reference) >= 0.9


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_from_config_stay_in_distribution(demo, noise, reference, name):
    scheduler = scheduler_class(name).from_config(demo.scheduler.config)
    volume = sample_with(demo, scheduler, noise, steps=50)
    assert np.mean(np.abs(volume) > 1.1) <= np.mean(np.abs(reference) > 1.1) + 0.01
    assert abs(volume.mean() - reference.mean()) < 0.15
    assert abs(volume.std() - reference.std()) < 0.15
    assert correlation(volume, reference) > 0.5


def test_every_short_name_keeps_the_schedule_and_the_solver_settings(demo):
    """The CLI names build the classes sampled above, with the exact betas and the solver settings of the config."""
    config = demo.scheduler.config
    for name in SCHEDULERS:
        scheduler = scheduler_from_name(name, config)
        torch.testing.assert_close(scheduler.alphas_cumprod, demo.scheduler.alphas_cumprod, atol=1e-6, rtol=0)
        for key, value in MedDiffusionDDIMScheduler.SOLVER_SETTINGS.items():
            assert scheduler.config[key] == value, (name, key)
        assert type(scheduler).__name__ in {*ODE_SOLVERS, *STOCHASTIC, "MedDiffusionDDIMScheduler"}


def test_schedulers_built_from_saved_configs_are_reproducible(demo, noise, tmp_path):
    """Two seeded calls agree for every scheduler, each built from the previous scheduler's saved config."""
    config_source = demo.scheduler
    warnings = ConfigWarnings()
    diffusers.utils.logging.get_logger("diffusers.configuration_utils").addHandler(warnings)
    try:
        for index, name in enumerate(CHAIN):
            folder = tmp_path / f"{index}-{name}"
            config_source.save_pretrained(folder)
            scheduler = scheduler_class(name).from_pretrained(folder)
            first = sample_with(demo, scheduler, None, steps=4, seed=7)
            second = sample_with(demo, scheduler, None, steps=4, seed=7)
            assert np.array_equal(first, second), name
            config_source = scheduler
    finally:
        diffusers.utils.logging.get_logger("diffusers.configuration_utils").removeHandler(warnings)
    assert not [m for m in warnings.messages if "not expected" in m]


def test_initial_noise_uses_the_scale_of_the_requested_timesteps(demo, tmp_path):
    """Euler's `init_noise_sigma` depends on `set_timesteps`: the denoiser must see unit-variance input."""
    MedDiffusionDDIMScheduler().save_pretrained(tmp_path)
    scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(tmp_path)
    seen = []
    original_forward = demo.unet.forward

    def record(sample, *args, **kwargs):
        seen.append(float(sample.std()))
        return original_forward(sample, *args, **kwargs)

    demo.unet.forward = record
    try:
        sample_with(demo, scheduler, None, steps=10)
    finally:
        del demo.unet.forward
    assert 0.8 < seen[0] < 1.2


def test_eta_reaches_the_original_stochastic_ddim(demo, noise):
    scheduler = MedDiffusionDDIMScheduler.from_config(demo.scheduler.config)
    deterministic = sample_with(demo, scheduler, noise, steps=20)
    stochastic = sample_with(demo, scheduler, noise, steps=20, eta=1.0)
    again = sample_with(demo, scheduler, noise, steps=20, eta=1.0)
    other_seed = sample_with(demo, scheduler, noise, steps=20, eta=1.0, seed=2)
    assert np.array_equal(stochastic, again)
    assert not np.allclose(stochastic, deterministic, atol=1e-3)
    assert not np.allclose(stochastic, other_seed, atol=1e-3)
    with pytest.raises(TypeError, match="sampling arguments"):
        MedDiffusionDDIMScheduler.from_config(demo.scheduler.config, eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        sample_with(demo, scheduler, noise, steps=2, eta=-1.0)


def test_ddim_eta_one_uses_the_posterior_variance():
    """With eta = 1 the DDIM noise term has the DDPM posterior variance (the original stochastic sampler)."""
    scheduler = MedDiffusionDDIMScheduler()
    scheduler.set_timesteps(10)
    t, prev = int(scheduler.timesteps[3]), int(scheduler.timesteps[4])
    sample = torch.zeros(1, 1, 4, 4, 4)
    eps = torch.zeros_like(sample)
    noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(0))
    out = scheduler.step(eps, t, sample, eta=1.0, generator=torch.Generator().manual_seed(0)).prev_sample
    alpha, alpha_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[prev]
    sigma = ((1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)).sqrt()
    torch.testing.assert_close(out, sigma * noise)


def test_a_scheduler_that_would_diverge_is_reported(demo, caplog):
    risky = diffusers.EulerDiscreteScheduler.from_config(demo.scheduler.config, timestep_spacing="linspace")
    warnings = ConfigWarnings()
    logger = diffusers.utils.logging.get_logger("meddiffusers.pipelines.pipeline_utils_3d")
    logger.addHandler(warnings)
    try:
        sample_with(demo, risky, None, steps=2)
    finally:
        logger.removeHandler(warnings)
    assert any("diverging sample" in message for message in warnings.messages)
