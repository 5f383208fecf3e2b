"""RePaint3DPipeline: replays the original RePaint (andreas128/RePaint@8e2a055) within the fixture's tolerances, its
jump schedules, the DDPM step it shares with diffusers, the known region in image, window and latent space, and the
input checks."""

import json
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file

import meddiffusers.pipelines.repaint.pipeline_repaint_3d as repaint_module
from meddiffusers import (
    BiFlowNet3DModel,
    MedDiffusionDDIMScheduler,
    MedDiffusionPipeline,
    PatchUNet3DModel,
    RePaint3DPipeline,
    RePaintDDPMScheduler,
    VQModel3D,
    meddiffusion_cosine_betas,
    repaint_jump_schedule,
)
from tests.conftest import FIXTURES

FIXTURE = FIXTURES / "repaint_tiny"
STATE_ATOL, X0_ATOL = 2e-5, 5e-5  # the fixture's tolerances


@pytest.fixture(scope="module")
def ref():
    return load_file(FIXTURE / "inputs_outputs.safetensors")


@pytest.fixture(scope="module")
def config():
    return json.loads((FIXTURE / "config.json").read_text())


def as_volume(image: torch.Tensor) -> torch.Tensor:
    """The fixtures' `(..., 3, S, S)` images as `(..., 1, 3, S, S)` volumes (the maths is elementwise)."""
    return image.unsqueeze(-4)


class AnalyticNetwork(ModelMixin, ConfigMixin):
    """The fixtures' network: `eps = 0.5 tanh(x) + 0.1 sin(3x) t / 1000 + 0.05`, then `variance_half` channels."""

    @register_to_config
    def __init__(self, variance_half: float = -1.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.inputs, self.timesteps = [], []

    def forward(self, sample, timestep):
        self.inputs.append(sample.clone())
        self.timesteps.append(int(timestep))
        t = torch.as_tensor(timestep).to(sample.dtype) / 1000
        eps = 0.5 * torch.tanh(sample) + 0.1 * torch.sin(3 * sample) * t + 0.05
        return torch.cat([eps, torch.full_like(sample, self.config.variance_half)], dim=1)


def recorded_draws(ref, run: str) -> list[torch.Tensor]:
    """The run's draws in the original's order: x_T, then per reverse step the sampling noise before the injection
    noise (none on the first step), per undo one draw."""
    draws, reverse, undo = [ref[f"{run}.x_T"]], 0, 0
    for kind in ref[f"{run}.move_kind"].tolist():
        if kind == 0:
            draws.append(ref[f"{run}.rev.noise_sample"][reverse])
            if ref[f"{run}.rev.injected"][reverse]:
                draws.append(ref[f"{run}.rev.noise_inject"][reverse])
            reverse += 1
        else:
            draws.append(ref[f"{run}.undo.noise"][undo])
            undo += 1
    return [as_volume(draw) for draw in draws]


def replay(ref, config, run: str, variance_type: str, **kwargs):
    """Run the pipeline on the fixture run with its recorded draws; returns the output, network and per-move states."""
    draws = iter(recorded_draws(ref, run))

    def next_draw(shape, generator=None, device=None, dtype=None, layout=None):
        draw = next(draws)
        assert tuple(draw.shape) == tuple(shape)
        return draw.to(device=device, dtype=dtype)

    unet = AnalyticNetwork(config["runs"][run]["variance_half"])
    scheduler = DDPMScheduler(
        beta_schedule="linear", timestep_spacing="linspace", variance_type=variance_type, clip_sample=True
    )
    pipe = RePaint3DPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    states = []

    def keep(pipeline, move, timestep, tensors):
        states.append((tensors["latents"].clone(), tensors["pred_original_sample"].clone()))
        return {}

    jump = config["runs"][run]["conf_overrides"]["schedule_jump_params"]
    with mock.patch.object(repaint_module, "randn_tensor", next_draw):
        output = pipe(
            as_volume(ref[f"{run}.gt"]),
            as_volume(ref[f"{run}.keep_mask"]),
            num_inference_steps=jump["t_T"],
            jump_length=jump["jump_length"],
            jump_n_sample=jump["jump_n_sample"],
            callback_on_step_end=keep,
            callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
            **kwargs,
        )
    assert next(draws, None) is None, "every recorded draw is used"
    return output.volumes, unet, states


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


# ------------------------------------------------------------------------------------------------ jump schedule


def test_jump_schedule_reproduces_every_schedule_of_the_original(ref, config):
    for entry in config["schedules"]:
        params = dict(entry["params"])
        times = repaint_jump_schedule(params.pop("t_T"), **params)
        assert times == ref[entry["key"]].tolist()
        moves = list(zip(times[:-1], times[1:]))
        assert sum(b < a for a, b in moves) == entry["n_model_calls"]
        assert sum(b > a for a, b in moves) == entry["n_undo"]


@pytest.mark.parametrize("kwargs", [{"jump_length": 0}, {"jump_n_sample": 0}, {"n_sample": 1.5}, {"jump2_length": -1}])
def test_jump_schedule_rejects_settings_it_cannot_walk(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        repaint_jump_schedule(20, **kwargs)


# ------------------------------------------------------------------------------------------------ scheduler


@pytest.mark.parametrize("run", ["main", "learned_var"])
def test_respaced_tables_are_guided_diffusions(ref, run):
    """Timesteps = guided-diffusion's respacing, the float64 tables equal the original's to float64 rounding."""
    scheduler = RePaintDDPMScheduler()
    scheduler.set_timesteps(len(ref[f"{run}.timestep_map"]))
    timesteps = scheduler.timesteps.flip(0)
    assert torch.equal(timesteps, ref[f"{run}.timestep_map"])
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    torch.testing.assert_close(alpha_bar, ref[f"{run}.alphas_cumprod_respaced"], rtol=1e-12, atol=0)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
    torch.testing.assert_close(1 - alpha_bar / previous, ref[f"{run}.betas_respaced"], rtol=1e-12, atol=0)
    log_variance = [scheduler._get_variance(t).log() for t in timesteps[1:]]
    torch.testing.assert_close(
        torch.stack(log_variance), ref[f"{run}.posterior_log_variance_clipped"][1:], rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_step_is_the_ddpm_step_with_the_callers_noise(variance_type):
    """Given the same (float64) tables, `step(..., variance_noise=z)` is `DDPMScheduler.step` drawing z."""
    ours = RePaintDDPMScheduler(variance_type=variance_type)
    theirs = DDPMScheduler(**{key: value for key, value in ours.config.items() if not key.startswith("_")})
    assert theirs.config.timestep_spacing == "linspace" and theirs.config.clip_sample
    theirs.alphas_cumprod = ours.alphas_cumprod
    for scheduler in (ours, theirs):
        scheduler.set_timesteps(25)
    sample = torch.randn(2, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    channels = 2 if variance_type == "learned_range" else 1
    model_output = torch.randn(2, channels, 4, 4, 4, generator=torch.Generator().manual_seed(1)).tanh()
    for t in ours.timesteps[[0, 12, -2, -1]]:
        noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(2))
        expected = theirs.step(model_output, t, sample, generator=torch.Generator().manual_seed(2))
        got = ours.step(model_output, t, sample, variance_noise=noise)
        torch.testing.assert_close(got.prev_sample, expected.prev_sample, atol=0, rtol=0)
        torch.testing.assert_close(got.pred_original_sample, expected.pred_original_sample, atol=0, rtol=0)
        drawn = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(2)).prev_sample
        torch.testing.assert_close(drawn, expected.prev_sample, atol=0, rtol=0)


def test_undo_is_one_forward_step_with_the_respaced_beta():
    scheduler = RePaintDDPMScheduler()
    scheduler.set_timesteps(50)
    sample, noise = torch.full((1, 1, 2, 2, 2), 0.5), torch.full((1, 1, 2, 2, 2), -1.0)
    high, low = scheduler.timesteps[9], scheduler.timesteps[10]
    beta = 1 - scheduler.alphas_cumprod[high] / scheduler.alphas_cumprod[low]
    expected = (1 - beta).sqrt() * 0.5 - beta.sqrt()
    torch.testing.assert_close(scheduler.undo_step(sample, high, noise), expected.float().expand(1, 1, 2, 2, 2))
    with pytest.raises(ValueError, match="undo"):
        scheduler.undo_step(sample, scheduler.timesteps[-1], noise)


def test_scheduler_refuses_variances_repaint_does_not_use():
    with pytest.raises(ValueError, match="variance_type"):
        RePaintDDPMScheduler(variance_type="fixed_large")


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize(
    "run, variance_type",
    [("main", "fixed_small"), ("main", "learned_range"), ("learned_var", "learned_range")],
)
def test_replay_reproduces_every_state_of_the_original(ref, config, run, variance_type):
    final, unet, states = replay(ref, config, run, variance_type, output_type="latent")

    # The network gets the original 1000-step timesteps and the re-injected input.
    assert unet.timesteps == ref[f"{run}.rev.t_model"].tolist()
    assert max_diff(torch.stack(unet.inputs), as_volume(ref[f"{run}.rev.x_model_in"])) <= STATE_ATOL
    kinds = ref[f"{run}.move_kind"].tolist()
    reverse = torch.stack([s for (s, _), kind in zip(states, kinds) if kind == 0])
    x0 = torch.stack([x for (_, x), kind in zip(states, kinds) if kind == 0])
    undo = torch.stack([s for (s, _), kind in zip(states, kinds) if kind == 1])
    assert max_diff(reverse, as_volume(ref[f"{run}.rev.x_out"])) <= STATE_ATOL
    assert max_diff(x0, as_volume(ref[f"{run}.rev.pred_xstart"])) <= X0_ATOL
    assert max_diff(undo, as_volume(ref[f"{run}.undo.x_out"])) <= STATE_ATOL
    assert max_diff(final, as_volume(ref[f"{run}.final_sample"])) <= STATE_ATOL
    assert max_diff(states[-1][1], as_volume(ref[f"{run}.final_pred_xstart"])) <= X0_ATOL


def test_without_composite_the_output_is_the_originals_and_with_it_the_known_voxels_are_the_image(ref, config):
    original, _, _ = replay(ref, config, "learned_var", "learned_range", output_type="pt", composite_known=False)
    composited, _, _ = replay(ref, config, "learned_var", "learned_range", output_type="pt")
    final, gt = as_volume(ref["learned_var.final_sample"]), as_volume(ref["learned_var.gt"])
    keep = as_volume(ref["learned_var.keep_mask"]).bool()
    assert max_diff(original, final) <= STATE_ATOL
    assert max_diff(original[keep], gt[keep]) > 0.01  # the original's known region is the model's reconstruction
    assert torch.equal(composited[keep], gt[keep])
    assert torch.equal(composited[~keep], original[~keep])


# ------------------------------------------------------------------------------------------------ behaviour


class ConstantNoise(ModelMixin, ConfigMixin):
    """Predicts the same noise everywhere, whatever the input (so `x0` leaves `[-1, 1]` unless clipped)."""

    @register_to_config
    def __init__(self, value: float = -3.0):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, sample, timestep):
        return torch.full_like(sample, self.config.value)


def small_pipeline(unet=None, **scheduler_kwargs):
    pipe = RePaint3DPipeline(unet or AnalyticNetwork(), RePaintDDPMScheduler(**scheduler_kwargs))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def half_mask(shape=(1, 1, 4, 4, 4)):
    mask = torch.zeros(shape)
    mask[..., : shape[-1] // 2] = 1
    return mask


SMALL = dict(num_inference_steps=6, jump_length=2, jump_n_sample=2)


def test_latent_output_is_the_final_state_unclipped_and_not_composited():
    pipe = small_pipeline(ConstantNoise(), clip_sample=False)
    image, mask = torch.zeros(1, 1, 4, 4, 4), half_mask()
    latent = pipe(image, mask, generator=torch.Generator().manual_seed(0), output_type="latent", **SMALL).volumes
    volume = pipe(image, mask, generator=torch.Generator().manual_seed(0), output_type="pt", **SMALL).volumes
    assert latent.max() > 1.5
    torch.testing.assert_close(volume, mask * image + (1 - mask) * latent.clamp(-1, 1), atol=0, rtol=0)


def test_one_generator_gives_one_result_and_a_list_gives_one_per_volume():
    pipe = small_pipeline()
    image = torch.rand(2, 1, 4, 4, 4) * 2 - 1

    def run(images, generator):
        return pipe(images, half_mask(), generator=generator, output_type="pt", **SMALL).volumes

    first = run(image[:1], torch.Generator().manual_seed(3))
    torch.testing.assert_close(run(image[:1], torch.Generator().manual_seed(3)), first, atol=0, rtol=0)
    assert max_diff(run(image[:1], torch.Generator().manual_seed(4)), first) > 1e-3
    both = run(image, [torch.Generator().manual_seed(3), torch.Generator().manual_seed(5)])
    torch.testing.assert_close(both[:1], first, atol=0, rtol=0)
    torch.testing.assert_close(both[1:], run(image[1:], torch.Generator().manual_seed(5)), atol=0, rtol=0)


def test_a_ddpm_scheduler_is_converted_with_its_settings_and_others_are_refused():
    pipe = RePaint3DPipeline(AnalyticNetwork(), DDPMScheduler(beta_schedule="squaredcos_cap_v2"))
    assert type(pipe.scheduler) is RePaintDDPMScheduler and pipe.scheduler.alphas_cumprod.dtype == torch.float64
    assert pipe.scheduler.config.timestep_spacing == "leading"  # DDPMScheduler's default, kept
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    with pytest.raises(ValueError, match="DDPM scheduler"):
        RePaint3DPipeline(AnalyticNetwork(), DDIMScheduler())


# ------------------------------------------------------------------------------------------------ windows


class OraclePatchUNet(PatchUNet3DModel):
    """A PatchUNet3DModel whose prediction is the exact noise of `clean` at each window's global position."""

    clean = None

    def forward(self, sample, timestep, class_labels=None, position=None, **kwargs):
        self.windows = getattr(self, "windows", 0) + 1
        size = self.clean.shape[2:]
        index = [((position[:, axis] + 1) / 2 * (n - 1)).round().long() for axis, n in enumerate(size)]
        clean = self.clean[0, 0][index[0], index[1], index[2]][:, None]
        alpha_bar = self.alphas_cumprod[int(timestep)].float()
        noise = (sample - alpha_bar.sqrt() * clean) / (1 - alpha_bar).sqrt()
        return type("Output", (), {"sample": noise})


def tiny_patch_unet(cls=PatchUNet3DModel, out_channels=1):
    torch.manual_seed(0)
    unet = cls(
        block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4,
        num_position_frequencies=2, out_channels=out_channels,
    )  # fmt: skip
    return unet.eval()


def test_windows_with_an_exact_oracle_keep_the_known_region_and_find_the_rest():
    unet = tiny_patch_unet(OraclePatchUNet)
    scheduler = RePaintDDPMScheduler()
    unet.alphas_cumprod = scheduler.alphas_cumprod
    unet.clean = torch.linspace(-0.8, 0.8, 8 * 8 * 12).reshape(1, 1, 8, 8, 12)
    pipe = RePaint3DPipeline(unet, scheduler)
    pipe.set_progress_bar_config(disable=True)
    mask = half_mask((1, 1, 8, 8, 12))
    output = pipe(
        unet.clean, mask, region="Chest", window_size=8, overlap=0.5, composite_known=False, output_type="pt",
        generator=torch.Generator().manual_seed(0), **SMALL,
    )  # fmt: skip
    times = repaint_jump_schedule(6, jump_length=2, jump_n_sample=2)
    assert unet.windows == 2 * sum(b < a for a, b in zip(times[:-1], times[1:]))  # two windows per model call
    torch.testing.assert_close(output.volumes, unet.clean, atol=1e-4, rtol=0)


def test_a_trained_style_patch_unet_runs_in_windows_with_a_learned_range_variance():
    pipe = RePaint3DPipeline(tiny_patch_unet(out_channels=2), RePaintDDPMScheduler(variance_type="learned_range"))
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.rand(1, 1, 8, 8, 12) * 2 - 1, half_mask((1, 1, 8, 8, 12))
    output = pipe(image, mask, region="Chest", window_size=8, generator=torch.Generator().manual_seed(0), **SMALL)
    volume = torch.from_numpy(output.volumes)
    assert output.regions == ["Chest"] and volume.shape == image.shape and volume.abs().max() <= 1
    assert torch.equal(volume[mask.bool()], image[mask.bool()])
    nifti = pipe(image, mask, region="Chest", window_size=8, generator=torch.Generator().manual_seed(0),
                 output_type="nifti", **SMALL).volumes  # fmt: skip
    hounsfield = torch.from_numpy(np.asarray(nifti[0].dataobj)).float()
    assert float(hounsfield.min()) >= -1400 - 1e-3 and float(hounsfield.max()) > 0  # chest window [-1400, 400]


# ------------------------------------------------------------------------------------------------ latent space


class LatentOracle(ModelMixin, ConfigMixin):
    """A class-conditional latent denoiser whose prediction is the exact noise of `clean` latents."""

    @register_to_config
    def __init__(self, in_channels: int = 4):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.clean, self.alphas_cumprod, self.labels = None, None, []

    def forward(self, sample, timestep, class_labels=None):
        self.labels.append(class_labels.tolist())
        alpha_bar = self.alphas_cumprod[int(timestep)].float()
        return (sample - alpha_bar.sqrt() * self.clean) / (1 - alpha_bar).sqrt()


@pytest.fixture(scope="module")
def vqvae():
    return VQModel3D.from_single_file(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt").eval()


def test_latent_space_keeps_the_encoded_known_latents_and_composites_in_image_space(vqvae):
    image = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    unet, scheduler = LatentOracle(), RePaintDDPMScheduler(beta_schedule="squaredcos_cap_v2")
    unet.clean = vqvae.normalize_latents(vqvae.encode(image).latents)
    unet.alphas_cumprod = scheduler.alphas_cumprod
    pipe = RePaint3DPipeline(unet, scheduler, vqvae=vqvae)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.ones(1, 1, 16, 16, 16)
    mask[..., 5:11, 5:11, 5:11] = 0  # latent voxels 1..2 on each axis touch it
    latent_mask = pipe.latent_mask(mask)
    assert latent_mask.shape == (1, 1, 4, 4, 4) and int((latent_mask == 0).sum()) == 8
    generator = torch.Generator().manual_seed(0)
    kwargs = dict(region="CTLegs", generator=generator, **SMALL)
    latents = pipe(image, mask, output_type="latent", **kwargs).volumes
    assert unet.labels[0] == [pipe.get_region("CTLegs").class_id]
    torch.testing.assert_close(latents, unet.clean.clamp(-1, 1), atol=1e-4, rtol=0)  # the last x0 is clipped
    volume = pipe(image, mask, output_type="pt", **kwargs).volumes
    decoded = pipe.decode_latents(latents).clamp(-1, 1)
    assert torch.equal(volume[mask.bool()], image[mask.bool()])
    torch.testing.assert_close(volume[~mask.bool()], decoded[~mask.bool()], atol=1e-4, rtol=0)


def test_a_meddiffusion_pipeline_inpaints_in_latent_space_through_from_pipe(vqvae):
    folder = FIXTURES / "biflownet_tiny"
    unet = BiFlowNet3DModel.from_single_file(folder / "biflownet_tiny.pt", original_config=folder / "config.json")
    meddiffusion = MedDiffusionPipeline(vqvae=vqvae, unet=unet, scheduler=MedDiffusionDDIMScheduler())
    scheduler = RePaintDDPMScheduler.from_config(meddiffusion.scheduler.config, timestep_spacing="linspace")
    pipe = RePaint3DPipeline.from_pipe(meddiffusion, scheduler=scheduler)
    assert pipe.vqvae is vqvae and pipe.unet is unet and pipe.get_region("CTLegs") == meddiffusion.get_region("CTLegs")
    torch.testing.assert_close(pipe.scheduler.betas, torch.from_numpy(meddiffusion_cosine_betas()), atol=0, rtol=0)
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.rand(1, 1, 32, 64, 64) * 2 - 1, half_mask((1, 1, 32, 64, 64))
    output = pipe(image, mask, region="CTLegs", num_inference_steps=2, jump_n_sample=1, output_type="pt")
    assert output.volumes.shape == image.shape and torch.equal(output.volumes[mask.bool()], image[mask.bool()])


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_image": torch.ones(1, 1, 4, 4, 3)}, "covers"),
        ({"mask_image": torch.ones(3, 1, 4, 4, 4)}, "broadcast"),
        ({"mask_image": torch.full((1, 1, 4, 4, 4), 0.5)}, "only 0"),
        ({"image": torch.full((1, 1, 4, 4, 4), float("nan"))}, "NaN"),
        ({"image": torch.full((1, 1, 4, 4, 4), 300.0)}, r"\[-1, 1\]"),
        ({"jump_length": 0}, "jump_length"),
        ({"jump_n_sample": 0}, "jump_n_sample"),
        ({"num_inference_steps": 1001}, "num_inference_steps"),
        ({"jump_schedule": [5, 4, 2, 1, 0, -1]}, "one index"),
        ({"jump_schedule": [4, 3, 2, 1, 0, -1]}, "start with 5"),
        ({"output_type": "png"}, "output_type"),
        ({"region": "Chest"}, "no `regions`"),
        ({"latents": torch.zeros(1, 1, 4, 4, 8)}, "shape"),
    ],
)
def test_bad_requests_fail_before_any_model_runs(kwargs, message):
    unet = AnalyticNetwork()
    pipe = small_pipeline(unet)
    call = dict(image=torch.zeros(1, 1, 4, 4, 4), mask_image=half_mask(), num_inference_steps=6) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe(**call)
    assert not unet.inputs


def test_a_learned_range_variance_needs_the_variance_channels():
    pipe = small_pipeline(ConstantNoise(), variance_type="learned_range")
    with pytest.raises(ValueError, match="2 model output channels"):
        pipe(torch.zeros(1, 1, 4, 4, 4), half_mask(), **SMALL)


def test_save_and_load_keep_the_scheduler_and_the_regions(tmp_path):
    pipe = RePaint3DPipeline(tiny_patch_unet(), RePaintDDPMScheduler(variance_type="learned_range"), window_size=8)
    pipe.save_pretrained(tmp_path)
    loaded = RePaint3DPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is RePaintDDPMScheduler and loaded.scheduler.config.variance_type == "learned_range"
    assert loaded.config.window_size == 8 and loaded.hu_window("Chest").min_hu == -1400


# ------------------------------------------------------------------------------------------------ anatomy


def analytic_eps(sample, timestep):
    t = torch.as_tensor(timestep).to(sample.dtype) / 1000
    return 0.5 * torch.tanh(sample) + 0.1 * torch.sin(3 * sample) * t + 0.05


class AnatomyPatchUNet(PatchUNet3DModel):
    """The analytic network plus 0.02 x each voxel's anatomy label: pointwise, so overlapping windows that each get
    their own crop of the anatomy blend to exactly the whole-volume network below."""

    def forward(self, sample, timestep, class_labels=None, position=None, anatomy=None, **kwargs):
        self.crops = getattr(self, "crops", []) + [None if anatomy is None else tuple(anatomy.shape)]
        eps = analytic_eps(sample, timestep)
        if anatomy is not None:
            eps = eps + 0.02 * anatomy.to(sample.dtype)
        return type("Output", (), {"sample": eps})


class WholeVolumeAnatomyNetwork(ModelMixin, ConfigMixin):
    """The same function on the whole volume, with the anatomy fixed inside the network."""

    @register_to_config
    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.labels = None

    def forward(self, sample, timestep):
        return analytic_eps(sample, timestep) + 0.02 * self.labels.to(sample.dtype)


def anatomy_patch_unet(encoding="label_map"):
    torch.manual_seed(0)
    return PatchUNet3DModel(
        block_out_channels=(8, 16), attention_levels=(False, False), mid_block_attention=False, norm_num_groups=4,
        num_position_frequencies=1, anatomy_encoding=encoding, num_anatomy_classes=5,
    ).eval()  # fmt: skip


def test_anatomy_reaches_every_window_and_gives_the_whole_volume_result():
    torch.manual_seed(1)
    image = torch.rand(1, 1, 8, 8, 12) * 1.6 - 0.8
    anatomy = torch.randint(0, 6, (1, 1, 8, 8, 12))
    mask = half_mask((1, 1, 8, 8, 12))
    unet = anatomy_patch_unet()
    unet.__class__ = AnatomyPatchUNet
    pipe = RePaint3DPipeline(unet, RePaintDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)

    def run(model_pipe, **kwargs):
        generator = torch.Generator().manual_seed(0)
        return model_pipe(image, mask, generator=generator, output_type="pt", **SMALL, **kwargs).volumes

    windowed = dict(region="Chest", window_size=8, overlap=0.5)
    conditioned = run(pipe, anatomy=anatomy[0, 0].numpy(), **windowed)  # (D, H, W) labels are accepted
    assert set(unet.crops) == {(1, 1, 8, 8, 8)}  # every call of every window got its crop (2 windows along W)
    unconditioned = run(pipe, **windowed)
    reference_net = WholeVolumeAnatomyNetwork()
    reference_net.labels = anatomy
    reference = run(small_pipeline(reference_net))
    torch.testing.assert_close(conditioned, reference, atol=1e-5, rtol=0)
    unknown = mask == 0
    assert (conditioned - unconditioned)[unknown].abs().max() > 0.05
    torch.testing.assert_close(conditioned[~unknown], image[~unknown], atol=0, rtol=0)


def test_a_real_anatomy_conditioned_patch_unet_depends_on_the_anatomy():
    pipe = RePaint3DPipeline(anatomy_patch_unet("one_hot"), RePaintDDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    image, mask = torch.zeros(1, 1, 8, 8, 8), half_mask((1, 1, 8, 8, 8))

    def run(labels):
        generator = torch.Generator().manual_seed(0)
        output = pipe(image, mask, region="Chest", anatomy=labels, generator=generator, output_type="pt", **SMALL)
        return output.volumes

    background, organ = torch.zeros(8, 8, 8, dtype=torch.long), torch.full((8, 8, 8), 3)
    torch.testing.assert_close(run(None), run(background), atol=0, rtol=0)  # omitted = all background
    assert (run(organ) - run(background)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("unet", "anatomy", "message"),
    [
        (lambda: anatomy_patch_unet(None), torch.zeros(8, 8, 8, dtype=torch.long), "takes none"),
        (AnalyticNetwork, torch.zeros(8, 8, 8, dtype=torch.long), "needs a PatchUNet3DModel"),
        (anatomy_patch_unet, torch.zeros(8, 8, 4, dtype=torch.long), "must cover the volume"),
        (anatomy_patch_unet, torch.full((8, 8, 8), 0.5), "integer labels"),
        (anatomy_patch_unet, torch.full((8, 8, 8), 6), r"\[0, 5\]"),
    ],
)
def test_bad_anatomy_is_refused_before_any_model_runs(unet, anatomy, message):
    pipe = RePaint3DPipeline(unet(), RePaintDDPMScheduler())
    region = "Chest" if isinstance(pipe.unet, PatchUNet3DModel) else None
    with pytest.raises(ValueError, match=message):
        pipe(torch.zeros(1, 1, 8, 8, 8), half_mask((1, 1, 8, 8, 8)), region=region, anatomy=anatomy, **SMALL)
