"""DiffPIRPipeline: parity with the original DiffPIR (every `diffpir_tiny` run replayed call by call), its schedule
tables, the three kinds of denoiser (any `unet(sample, t)`, windowed patch priors, latent priors), outputs and input
checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, ModelMixin
from safetensors.torch import load_file

from meddiffusers import DiffPIRPipeline, HUWindow, IdentityOperator, LinearOperator, MaskOperator, PatchUNet3DModel
from meddiffusers.operators import AveragePoolOperator, RayTransform
from meddiffusers.pipelines.diffpir import DiffPIRSchedule, IntensityMap, diffpir_timesteps, pipeline_diffpir

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "diffpir_tiny"
STATE_ATOL, X0_ATOL = 2e-5, 5e-5  # the fixture's tolerances (README)
NOISE_KINDS = {"p_sample": 1, "z_eta": 2, "z_zeta": 3, "z_setback": 4}


@pytest.fixture(scope="module")
def fixture():
    return load_file(FIXTURE / "inputs_outputs.safetensors")


class AnalyticDenoiser(ModelMixin):
    """The fixtures' stand-in network `eps(x, t) = 0.5 tanh(x) + 0.1 sin(3x) t / 1000 + 0.05`; records its inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, sample, timestep):
        self.calls.append((sample.clone(), int(timestep)))
        return 0.5 * torch.tanh(sample) + 0.1 * torch.sin(3 * sample) * (timestep.float() / 1000.0) + 0.05


class MatrixOperator(LinearOperator):
    """The first-order runs' dense operator: `vec(x) @ A.T` per batch item."""

    def __init__(self, matrix, shape):
        self.matrix, self.shape = matrix, tuple(shape)

    def forward(self, x):
        return x.flatten(1) @ self.matrix.T

    def adjoint(self, y):
        return (y @ self.matrix).reshape(-1, *self.shape)


# run -> (operator kind, call arguments); the 2D runs' (B, C, H, W) images are volumes (B, 1, C, H, W).
RUNS = {
    "inpaint_script": ("mask", dict(noise_level=0.0, lambda_=1.0, zeta=1.0, eta=0.0)),
    "inpaint": ("mask", dict(noise_level=0.0, lambda_=1.0, zeta=1.0, eta=0.0)),
    "denoise": ("identity", dict(noise_level=0.05, lambda_=7.0, zeta=0.3, eta=0.0)),
    "firstorder_eta0": ("matrix", dict(noise_level=0.05, lambda_=7.0, zeta=0.3, eta=0.0, data_step="first_order")),
    "firstorder_eta05": ("matrix", dict(noise_level=0.05, lambda_=7.0, zeta=0.3, eta=0.5, data_step="first_order")),
    "firstorder_U2": (
        "matrix",
        dict(noise_level=0.05, lambda_=7.0, zeta=0.3, eta=0.0, data_step="first_order", repeats=2),
    ),
}


def as_volume(tensor):
    return tensor[:, None] if tensor.ndim == 4 else tensor


def replay(fixture, run, monkeypatch):
    """Run the pipeline on a fixture run with its recorded noise; returns the pipeline, its network and a record."""
    kind, arguments = RUNS[run]
    data = {key[len(run) + 1 :]: value for key, value in fixture.items() if key.startswith(run + ".")}
    x_init = as_volume(data["x_init"])
    if kind == "matrix":
        operator, measurement = MatrixOperator(data["A"], x_init.shape[1:]), data["measurement"]
    else:
        measurement = as_volume(data["measurement"])
        operator = MaskOperator(as_volume(data["mask"])) if kind == "mask" else IdentityOperator()
    # Every draw of the pipeline, in order, is the next recorded draw that is not the init or a p_sample draw.
    noises = [
        noise
        for noise, code in zip(data["noise"], data["noise_kind"].tolist())
        if code not in (0, NOISE_KINDS["p_sample"])
    ]

    def recorded_noise(shape, generator=None, device=None, dtype=None, layout=None):
        noise = as_volume(noises.pop(0))
        assert tuple(shape) == tuple(noise.shape)
        return noise.to(device=device, dtype=dtype)

    monkeypatch.setattr(pipeline_diffpir, "randn_tensor", recorded_noise)
    unet = AnalyticDenoiser()
    pipe = DiffPIRPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    steps = []

    def record(pipe, step, timestep, tensors):
        steps.append({name: value.clone() for name, value in tensors.items()})
        return {}

    final = pipe(
        measurement, operator, num_inference_steps=20, skip_type="quad", latents=x_init, output_type="latent",
        callback_on_step_end=record, callback_on_step_end_tensor_inputs=["latents", "x0_prior", "x0_data", "renoised"],
        **arguments,
    ).volumes  # fmt: skip
    assert not noises  # every recorded draw was used
    return data, unet, steps, final


def max_error(ours, theirs):
    """Largest difference; the fixtures' (.., C, H, W) images are our (.., 1, C, H, W) volumes, same element order."""
    return (ours.reshape(theirs.shape) - theirs).abs().max().item()


@pytest.mark.parametrize("run", list(RUNS))
def test_replays_the_original_trajectory(fixture, run, monkeypatch):
    data, unet, steps, final = replay(fixture, run, monkeypatch)
    assert [t for _, t in unet.calls] == data["t"].tolist()
    stacked = {name: torch.stack([step[name] for step in steps]) for name in steps[0]}
    inputs = torch.stack([sample for sample, _ in unet.calls])
    errors = {
        "x_in": max_error(inputs, data["x_in"]),
        "x0_model": max_error(stacked["x0_prior"], data["x0_model"]),
        "x0_data": max_error(stacked["x0_data"], data["x0_data"]),
        "x_renoised": max_error(stacked["renoised"], data["x_renoised"]),
        "x_after": max_error(stacked["latents"], data["x_after"]),
        "final_x": max_error(final, data["final_x"]),
    }
    print(run, {name: f"{value:.2e}" for name, value in errors.items()})
    for name, value in errors.items():
        assert value <= (X0_ATOL if name.startswith("x0") else STATE_ATOL), (name, value)


def test_schedule_tables_match_the_original(fixture):
    schedule = DiffPIRSchedule.from_scheduler(DDPMScheduler())
    torch.testing.assert_close(schedule.betas, fixture["script.betas"], rtol=0, atol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, fixture["script.alphas_cumprod"], rtol=0, atol=0)
    torch.testing.assert_close(schedule.sqrt_alphas_cumprod, fixture["script.sqrt_alphas_cumprod"], rtol=0, atol=0)
    torch.testing.assert_close(
        schedule.sqrt_1m_alphas_cumprod, fixture["script.sqrt_1m_alphas_cumprod"], rtol=0, atol=0
    )
    torch.testing.assert_close(schedule.sigmabar, fixture["sigmabar_t"], rtol=2e-6, atol=0)
    torch.testing.assert_close(schedule.model_alphas_cumprod, fixture["diffusion.alphas_cumprod"], rtol=1e-12, atol=0)
    c1, c2 = zip(*(schedule.x0_coefficients(t) for t in range(1000)))
    torch.testing.assert_close(torch.stack(c1), fixture["diffusion.sqrt_recip_alphas_cumprod"].float())
    torch.testing.assert_close(torch.stack(c2), fixture["diffusion.sqrt_recipm1_alphas_cumprod"].float())
    for lambda_ in (1, 7):
        for sigma in ("0", "0.05"):
            expected = fixture[f"rho.lambda{lambda_}.sigma_n{sigma}"]
            torch.testing.assert_close(schedule.rho(float(lambda_), float(sigma)), expected, rtol=1e-5, atol=0)
    for run in RUNS:
        t = fixture[f"{run}.t"]
        torch.testing.assert_close(schedule.sigmabar[t], fixture[f"{run}.sigmabar_t"], rtol=2e-6, atol=0)
        lambda_, sigma = RUNS[run][1]["lambda_"], RUNS[run][1]["noise_level"]
        torch.testing.assert_close(schedule.rho(lambda_, sigma)[t], fixture[f"{run}.rho_t"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("skip_type", ["quad", "uniform"])
@pytest.mark.parametrize("steps", [10, 20, 100])
def test_timestep_sequences_match_the_original(fixture, skip_type, steps):
    timesteps = diffpir_timesteps(steps, skip_type)
    assert timesteps == fixture[f"t_visited.{skip_type}.N{steps}"].tolist()
    assert [999 - t for t in timesteps] == fixture[f"seq.{skip_type}.N{steps}"].tolist()


def analytic_pipeline():
    pipe = DiffPIRPipeline(unet=AnalyticDenoiser(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_draws_and_calls_per_step_and_outputs():
    """z_eta and z_zeta at every re-noised step (even with eta = 0), a set-back draw between repeats, one start draw;
    `latent` is the unclipped final state, `pt` / `np` clip it."""
    pipe = analytic_pipeline()
    truth = torch.linspace(-0.9, 0.9, 2 * 3 * 4 * 4).view(2, 1, 3, 4, 4)
    kwargs = dict(noise_level=0.05, num_inference_steps=5, zeta=1.0, repeats=2)
    draws = []
    original = pipeline_diffpir.randn_tensor

    def counting(shape, **kw):
        draws.append(tuple(shape))
        return original(shape, **kw)

    pipeline_diffpir.randn_tensor = counting
    try:
        latent = pipe(
            truth, IdentityOperator(), generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
        )
    finally:
        pipeline_diffpir.randn_tensor = original
    assert len(pipe.unet.calls) == 10 and pipe.num_timesteps == 10
    assert draws == [tuple(truth.shape)] * (
        1 + 4 * 3 + 4 * 2
    )  # start, then per re-noised call z_eta, z_zeta, set-back
    volumes = pipe(truth, IdentityOperator(), generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)
    torch.testing.assert_close(volumes.volumes, latent.volumes.clamp(-1, 1))
    array = pipe(truth, IdentityOperator(), generator=[torch.Generator().manual_seed(0)] * 2, **kwargs).volumes
    assert isinstance(array, np.ndarray) and array.shape == truth.shape


def test_replacing_diffusers_randn_tensor_reaches_every_draw(monkeypatch):
    from diffusers.utils import torch_utils

    monkeypatch.setattr(torch_utils, "randn_tensor", lambda shape, **kw: torch.zeros(shape))
    truth = torch.full((1, 1, 2, 3, 3), 0.5)
    once = analytic_pipeline()(truth, IdentityOperator(), 0.05, num_inference_steps=4, output_type="latent")
    again = analytic_pipeline()(truth, IdentityOperator(), 0.05, num_inference_steps=4, output_type="latent")
    torch.testing.assert_close(once.volumes, again.volumes, rtol=0, atol=0)  # no draw escaped the patch


def test_intensity_map_runs_the_data_step_in_data_space():
    """Prox steps are invariant to an affine intensity map: restoring HU measurements through the window's map gives
    the model-space result."""
    window = HUWindow(-160.0, 240.0)
    truth = torch.linspace(-0.8, 0.8, 48).view(1, 1, 3, 4, 4)
    operator = AveragePoolOperator(3)
    model_space = analytic_pipeline()(
        operator(truth), operator, 0.1, num_inference_steps=4, latents=torch.zeros_like(truth), output_type="pt",
        generator=torch.Generator().manual_seed(1),
    ).volumes  # fmt: skip
    hu = IntensityMap.from_hu_window(window).to_data(truth)
    data_space = analytic_pipeline()(
        operator(hu), operator, 0.1, num_inference_steps=4, latents=torch.zeros_like(truth), output_type="pt",
        intensity_map=window, generator=torch.Generator().manual_seed(1),
    ).volumes  # fmt: skip
    torch.testing.assert_close(data_space, model_space, atol=1e-5, rtol=0)
    nifti = analytic_pipeline()(
        operator(hu), operator, 0.1, num_inference_steps=4, latents=torch.zeros_like(truth), output_type="nifti",
        intensity_map=window, generator=torch.Generator().manual_seed(1),
    ).volumes  # fmt: skip
    assert np.asarray(nifti[0].dataobj).max() > 100  # HU


def test_cg_and_closed_form_data_steps_agree_and_ct_runs_with_cg():
    truth = torch.linspace(-0.5, 0.5, 32).view(1, 1, 2, 4, 4)
    operator = MaskOperator(torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5)
    results = [
        analytic_pipeline()(
            operator(truth), operator, 0.05, num_inference_steps=3, data_step=step, latents=torch.zeros_like(truth),
            generator=torch.Generator().manual_seed(2), output_type="latent",
        ).volumes
        for step in ("closed_form", "cg")
    ]  # fmt: skip
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=1e-5)
    ct = RayTransform((8, 8), num_views=4, cg_iterations=3)
    volume = torch.zeros(1, 1, 1, 8, 8)
    out = analytic_pipeline()(ct(volume), ct, 0.05, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.volumes.shape == (1, 1, 1, 8, 8)


def test_patch_prior_uses_sliding_windows_with_region(tmp_path):
    torch.manual_seed(0)
    unet = PatchUNet3DModel(
        block_out_channels=(8, 16), attention_levels=(False, False), mid_block_attention=False, norm_num_groups=4,
        num_position_frequencies=1,
    ).eval()  # fmt: skip
    regions = [{"name": "Chest", "class_id": 1, "spacing": [2.0, 1.0, 1.0], "intensity_window": [-160, 240]}]
    pipe = DiffPIRPipeline(unet=unet, scheduler=DDPMScheduler(), regions=regions, window_size=4)
    pipe.set_progress_bar_config(disable=True)
    windows = []
    forward = unet.forward

    def counting_forward(sample, *args, **kwargs):
        windows.append(tuple(sample.shape))
        return forward(sample, *args, **kwargs)

    unet.forward = counting_forward
    operator = MaskOperator.keep_slices((4, 8, 4), kept=[0, 2])
    measurement = operator(torch.zeros(1, 1, 4, 8, 4))
    output = pipe(measurement, operator, 0.05, num_inference_steps=2, region="Chest", overlap=0.5, output_type="pt")
    assert output.regions == ["Chest"] and output.affines[0][2, 2] == 2.0
    assert set(windows) == {(1, 1, 4, 4, 4)} and len(windows) == 2 * 3  # 3 windows along H per call
    with pytest.raises(ValueError, match="region"):
        pipe(measurement, operator, 0.05, num_inference_steps=2)
    unet.forward = forward
    pipe.save_pretrained(tmp_path)
    loaded = DiffPIRPipeline.from_pretrained(tmp_path)
    assert loaded.vqvae is None and loaded.config.window_size == 4
    assert loaded.region_registry.resolve("chest").class_id == 1


def test_latent_prior_decodes_and_re_encodes_for_the_data_step():
    from meddiffusers import MedDiffusionPipeline
    from meddiffusers.demo import demo_model_path

    demo = MedDiffusionPipeline.from_pretrained(demo_model_path())
    pipe = DiffPIRPipeline.from_pipe(demo)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vqvae is demo.vqvae
    encodes = []
    encode = pipe.vqvae.encode
    pipe.vqvae.encode = lambda sample, **kw: encodes.append(sample.shape) or encode(sample, **kw)
    truth = torch.zeros(1, 1, 32, 64, 64) - 0.5
    operator = MaskOperator.keep_slices((32, 64, 64), kept=range(0, 32, 2))
    output = pipe(operator(truth), operator, 0.05, num_inference_steps=2, region="MRBrain", output_type="latent")
    assert output.volumes.shape == (1, 4, 8, 16, 16)
    assert len(encodes) == 2  # the start guess, then one data step (none at the last timestep)
    volumes = pipe(
        operator(truth), operator, 0.05, num_inference_steps=2, region=0, latents=output.volumes, output_type="pt"
    ).volumes
    assert volumes.shape == truth.shape and volumes.abs().max() <= 1


def test_bad_inputs_raise_before_the_model_runs():
    pipe = analytic_pipeline()
    y = torch.zeros(1, 1, 2, 4, 4)
    identity, ct, pool = IdentityOperator(), RayTransform((4, 4), 3), AveragePoolOperator(2)
    bad = [
        (dict(operator=lambda x: x), "LinearOperator"),
        (dict(noise_level=-0.1), "noise_level"),
        (dict(zeta=1.5), "zeta"),
        (dict(eta=2.0), "eta"),
        (dict(lambda_=0), "lambda_"),
        (dict(repeats=0), "repeats"),
        (dict(skip_type="linear"), "skip_type"),
        (dict(num_inference_steps=1), "num_inference_steps"),
        (dict(data_step="exact"), "data_step"),
        (dict(operator=ct, measurement=torch.zeros(1, 1, 2, 3, 6), data_step="closed_form"), "closed-form"),
        (dict(start_timestep=1000), "start_timestep"),
        (dict(latents=torch.zeros(1, 1, 2, 4, 5)), "latents"),
        (dict(output_type="png"), "output_type"),
        (dict(overlap=1.0), "overlap"),
        (dict(intensity_map="soft_tissue"), "intensity_map"),
        (dict(region="Chest"), "regions"),
        (dict(measurement=torch.full((1, 1, 2, 4, 4), float("nan"))), "NaN"),
        (dict(operator=pool, measurement=y, latents=y), "latents"),
        (dict(operator=MaskOperator(torch.ones(3, 4, 4))), "measurement"),
    ]  # fmt: skip
    for overrides, message in bad:
        arguments = dict(measurement=y, operator=identity, noise_level=0.05) | overrides
        with pytest.raises(ValueError, match=message):
            pipe(**arguments)
    assert not pipe.unet.calls


def test_anatomy_reaches_every_window_and_gives_the_whole_volume_result():
    from tests.pipelines.repaint.test_repaint_3d import AnatomyPatchUNet, WholeVolumeAnatomyNetwork, anatomy_patch_unet

    torch.manual_seed(1)
    truth = torch.rand(1, 1, 8, 8, 12) * 1.6 - 0.8
    anatomy = torch.randint(0, 6, (1, 1, 8, 8, 12))
    mask = torch.ones_like(truth)
    mask[..., 6:] = 0
    operator = MaskOperator(mask)
    unet = anatomy_patch_unet()
    unet.__class__ = AnatomyPatchUNet
    pipe = DiffPIRPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    reference_net = WholeVolumeAnatomyNetwork()
    reference_net.labels = anatomy
    reference_pipe = DiffPIRPipeline(unet=reference_net, scheduler=DDPMScheduler())
    reference_pipe.set_progress_bar_config(disable=True)

    def run(model_pipe, **kwargs):
        generator = torch.Generator().manual_seed(0)
        settings = dict(num_inference_steps=5, generator=generator, output_type="latent")
        return model_pipe(operator(truth), operator, 0.05, **settings, **kwargs).volumes

    windowed = dict(region=0, window_size=8, overlap=0.5)
    conditioned = run(pipe, anatomy=anatomy, **windowed)
    assert set(unet.crops) == {(1, 1, 8, 8, 8)}
    torch.testing.assert_close(conditioned, run(reference_pipe), atol=1e-5, rtol=0)
    assert (conditioned - run(pipe, **windowed)).abs().max() > 0.05
    with pytest.raises(ValueError, match="takes none"):
        DiffPIRPipeline(unet=anatomy_patch_unet(None), scheduler=DDPMScheduler())(
            operator(truth), operator, 0.05, region=0, window_size=8, anatomy=anatomy
        )
