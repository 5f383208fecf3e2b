"""PatchSlidingWindowPipeline: windowed noise estimates equal the whole-volume ones where they should, the blend is
normalised, windows stay inside the volume, any scheduler plugs in, and anomaly maps find what differs."""

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.torch_utils import randn_tensor

from meddiffusers import PatchSlidingWindowPipeline, PatchUNet3DModel, window_coordinates


def training_scheduler():
    return DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True, thresholding=True, sample_max_value=1.0)


class PointwiseDenoiser(ModelMixin, ConfigMixin):
    """A translation-equivariant stand-in for the U-Net: a voxel's prediction depends on that voxel only.

    It records the windows it sees. With `mode="position"` it returns the window's global D coordinate (to check
    that every window gets its own coordinates); with `mode="oracle"` it returns the exact noise of `healthy` at
    the window's position, so the one-step reconstruction is `healthy`.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, mode: str = "pointwise"):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))
        self.size_multiple = 4
        self.seen = []
        self.healthy = None
        self.alphas_cumprod = None

    def forward(self, sample, timestep, class_labels=None, position=None, anatomy=None, **residuals):
        self.seen.append((tuple(sample.shape), position.clone(), None if anatomy is None else anatomy.clone()))
        if self.config.mode == "position":
            return type("Out", (), {"sample": position[:, :1].clone()})
        if self.config.mode == "oracle":
            size = self.healthy.shape[2:]
            index = [((position[:, a] + 1) / 2 * (n - 1)).round().long() for a, n in enumerate(size)]
            healthy = self.healthy[0, 0][index[0], index[1], index[2]][:, None]
            alpha_bar = self.alphas_cumprod[int(timestep)]
            return type("Out", (), {"sample": (sample - alpha_bar.sqrt() * healthy) / (1 - alpha_bar).sqrt()})
        t = torch.as_tensor(timestep, dtype=sample.dtype) / 1000
        return type("Out", (), {"sample": torch.tanh(self.scale * sample) * (1 - t) + 0.1 * sample**2})


def pipeline(unet=None, scheduler=None):
    pipe = PatchSlidingWindowPipeline(
        unet if unet is not None else PointwiseDenoiser(),
        scheduler or DDIMScheduler.from_config(training_scheduler().config),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_unet():
    torch.manual_seed(0)
    unet = PatchUNet3DModel(
        block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4,
        num_position_frequencies=2, anatomy_encoding="label_map", num_anatomy_classes=4,
    )  # fmt: skip
    return unet.eval()


def generate(pipe, seed=0, **kwargs):
    kwargs = dict(region="Chest", num_inference_steps=4, output_type="pt") | kwargs
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).volumes


def test_a_volume_that_fits_one_window_is_the_plain_denoising_loop():
    unet = tiny_unet()
    pipe = pipeline(unet)
    anatomy = torch.randint(0, 5, (1, 1, 8, 8, 8))
    volume = generate(pipe, volume_size=(8, 8, 8), window_size=8, anatomy=anatomy, eta=0.0)

    scheduler = DDIMScheduler.from_config(training_scheduler().config)
    scheduler.set_timesteps(4)
    sample = randn_tensor((1, 1, 8, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in scheduler.timesteps:
            noise = unet(sample, t, class_labels=torch.tensor([1]), anatomy=anatomy).sample
            sample = scheduler.step(noise, t, sample).prev_sample
    torch.testing.assert_close(volume, sample.clamp(-1, 1), atol=0, rtol=0)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_windows_leave_no_seams_with_a_translation_equivariant_denoiser(blend):
    pipe = pipeline()
    size = (16, 20, 28)
    whole = generate(pipe, volume_size=size, window_size=32, blend=blend)
    windowed = generate(pipe, volume_size=size, window_size=8, overlap=0.5, blend=blend, window_batch_size=3)
    assert len(pipe.unet.seen) > 4 * 12
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_blended_noise_is_normalised_and_each_window_gets_its_global_coordinates(blend):
    pipe = pipeline(PointwiseDenoiser(mode="position"))
    size = (12, 16, 20)
    sample = torch.zeros(2, 1, *size)
    noise = pipe.predict_noise(sample, 10, torch.tensor([0, 2]), window_size=8, overlap=0.25, blend=blend)
    # The D coordinate map, blended with weights that sum to one, is the D coordinate map.
    expected = window_coordinates(size)[0].expand(2, 1, *size)
    torch.testing.assert_close(noise, expected, atol=1e-6, rtol=1e-6)


def test_border_windows_are_clamped_inside_the_volume_not_padded():
    pipe = pipeline()
    generate(pipe, volume_size=(12, 16, 20), window_size=8, overlap=0.5, num_inference_steps=1)
    seen = pipe.unet.seen
    assert {shape for shape, _, _ in seen} == {(1, 1, 8, 8, 8)}
    positions = torch.cat([position for _, position, _ in seen])
    assert positions.min() == -1 and positions.max() == 1  # the last windows end on the border, no further
    starts = sorted({round(float(p[0, 0, 0, 0]), 4) for p in positions})
    assert starts == [round(-1 + 2 * s / 11, 4) for s in (0, 4)]  # D starts 0 and 4 (= 12 - 8), not 8


def test_anatomy_is_cropped_with_each_window():
    pipe = pipeline()
    anatomy = torch.arange(16)[:, None, None].expand(16, 8, 8).clone()  # label = D index
    generate(pipe, volume_size=(16, 8, 8), window_size=8, overlap=0.5, anatomy=anatomy, num_inference_steps=1)
    for _, position, crop in pipe.unet.seen:
        first_d = round(float((position[0, 0, 0, 0, 0] + 1) / 2 * 15))
        assert torch.equal(crop[0, 0, :, 0, 0], torch.arange(first_d, first_d + 8))


def test_one_generator_gives_one_volume():
    pipe = pipeline(tiny_unet())
    kwargs = dict(volume_size=(8, 16, 16), window_size=8, overlap=0.5)
    first, again, other = generate(pipe, 3, **kwargs), generate(pipe, 3, **kwargs), generate(pipe, 4, **kwargs)
    torch.testing.assert_close(first, again, atol=0, rtol=0)
    assert (first - other).abs().max() > 1e-3


@pytest.mark.parametrize(
    "scheduler_class",
    [
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
    ],  # fmt: skip
)
def test_any_diffusers_scheduler_plugs_in_and_windows_still_leave_no_seams(scheduler_class):
    scheduler = scheduler_class.from_config(training_scheduler().config)
    pipe = pipeline(scheduler=scheduler)
    whole = generate(pipe, volume_size=(8, 16, 16), window_size=16, num_inference_steps=5)
    windowed = generate(pipe, volume_size=(8, 16, 16), window_size=8, overlap=0.5, num_inference_steps=5)
    assert torch.isfinite(whole).all() and whole.abs().max() <= 1
    torch.testing.assert_close(windowed, whole, atol=1e-5, rtol=1e-5)


def test_nifti_output_is_in_hounsfield_units_with_the_region_spacing(tmp_path):
    pipe = pipeline()
    output = pipe("Chest", volume_size=(8, 12, 16), window_size=8, num_inference_steps=2, output_type="nifti",
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
    model_space = generate(pipe, volume_size=(8, 12, 16), window_size=8, num_inference_steps=2)
    image = output.volumes[0]
    assert image.shape == (12, 16, 8) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    hounsfield = np.transpose(image.get_fdata(), (2, 0, 1))
    np.testing.assert_allclose(hounsfield, (model_space[0, 0].numpy() + 1) / 2 * 1800 - 1400, atol=1e-3)
    path = output.save(tmp_path / "chest.nii.gz")[0]
    np.testing.assert_allclose(nib.load(path).get_fdata(), image.get_fdata(), atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(region="Knee"), "Unknown region"),
        (dict(volume_size=(10, 8, 8)), "multiples of 4"),
        (dict(window_size=6), "multiples of 4"),
        (dict(blend="cosine"), "blend"),
        (dict(overlap=1.0), "overlap"),
        (dict(output_type="latent"), "image space"),
        (dict(anatomy=torch.zeros(4, 8, 8, dtype=torch.long)), "anatomy"),
        (dict(controlnet_cond=torch.zeros(8, 8, 8)), "no `controlnet`"),
    ],
)
def test_bad_requests_fail_before_any_denoising(kwargs, message):
    pipe = pipeline()
    kwargs = dict(volume_size=(8, 8, 8), window_size=8) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(pipe, **kwargs)
    assert pipe.unet.seen == []


def test_save_and_load_keeps_regions_and_hu_windows(tmp_path):
    pipe = pipeline(tiny_unet(), training_scheduler())
    pipe.save_pretrained(tmp_path)
    loaded = PatchSlidingWindowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.controlnet is None and loaded.get_region("HaN").intensity_window == (-150.0, 250.0)
    kwargs = dict(volume_size=(8, 16, 8), window_size=8)
    torch.testing.assert_close(generate(pipe, **kwargs), generate(loaded, **kwargs), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- anomalies


def oracle_pipeline(healthy):
    scheduler = training_scheduler()
    unet = PointwiseDenoiser(mode="oracle")
    unet.healthy, unet.alphas_cumprod = healthy, scheduler.alphas_cumprod
    return pipeline(unet, scheduler)


def test_anomaly_map_is_where_the_volume_differs_from_what_the_model_reconstructs():
    healthy = torch.linspace(-0.5, 0.5, 8 * 16 * 16).reshape(1, 1, 8, 16, 16)
    lesion = torch.zeros_like(healthy)
    lesion[..., 2:5, 3:7, 9:12] = 0.4
    pipe = oracle_pipeline(healthy)
    result = pipe.detect_anomalies(healthy + lesion, "Chest", window_size=8, overlap=0.5,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    torch.testing.assert_close(result.reconstruction, healthy, atol=1e-3, rtol=0)
    torch.testing.assert_close(result.anomaly_map, lesion, atol=1e-3, rtol=0)
    torch.testing.assert_close(result.scores, torch.tensor([0.4]), atol=1e-3, rtol=0)

    organ = torch.zeros(8, 16, 16, dtype=torch.long)
    organ[:, :, 8:] = 1
    masked = pipe.detect_anomalies(healthy + lesion, "Chest", window_size=8, organ_mask=organ, score_reduction="mean",
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert masked.anomaly_map[..., :8].abs().max() == 0
    expected_mean = float(lesion[..., 8:].sum() / organ.sum())
    assert masked.scores.item() == pytest.approx(expected_mean, abs=1e-3)
    smoothed = pipe.detect_anomalies(healthy + lesion, "Chest", window_size=8, smoothing_sigma=1.0,
                                     generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert smoothed.anomaly_map.max() < 0.4 and smoothed.anomaly_map.sum() == pytest.approx(
        lesion.sum().item(), rel=0.05
    )


def test_anomaly_detection_with_the_ancestral_chain_runs_a_real_model():
    pipe = pipeline(tiny_unet(), training_scheduler())
    volume = torch.rand(1, 1, 8, 16, 8) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    result = pipe.detect_anomalies(volume, "Abdomen", reconstruction="ancestral", num_inference_steps=10,
                                   window_size=8, score_reduction=0.99, generator=generator)  # fmt: skip
    assert result.anomaly_map.shape == volume.shape and result.reconstruction.abs().max() <= 1
    assert 0 < result.scores.item() <= result.anomaly_map.max().item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(volume=torch.full((8, 8, 8), 300.0)), "model space"),
        (dict(reconstruction="full"), "reconstruction"),
        (dict(timestep=1000), "timestep"),
        (dict(score_reduction="median"), "score_reduction"),
        (dict(organ_mask=torch.ones(4, 8, 8)), "organ_mask"),
    ],
)
def test_bad_anomaly_requests_are_refused(kwargs, message):
    pipe = pipeline()
    kwargs = dict(volume=torch.zeros(8, 8, 8), region="Chest", window_size=8) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe.detect_anomalies(**kwargs)


def test_thresholding_of_the_saved_scheduler_equals_clipping_and_takes_volumes_over_2_to_the_24_voxels():
    thresholded = DDIMScheduler.from_config(training_scheduler().config)
    clipped = DDIMScheduler.from_config(training_scheduler().config, thresholding=False)
    size = (8, 16, 16)
    reference = generate(pipeline(scheduler=clipped), volume_size=size, window_size=16)
    torch.testing.assert_close(generate(pipeline(scheduler=thresholded), volume_size=size, window_size=16), reference)
    # torch.quantile, which diffusers' dynamic thresholding uses, refuses more than 2**24 elements.
    large = (260, 256, 256)
    volume = generate(pipeline(scheduler=thresholded), volume_size=large, window_size=large, num_inference_steps=1)
    assert volume.shape == (1, 1, *large) and volume.abs().max() <= 1
    assert thresholded._threshold_sample.__func__ is DDIMScheduler._threshold_sample  # restored after the call


def test_callbacks_see_and_may_replace_the_state_at_every_step():
    pipe = pipeline()
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append((step, sorted(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == 2 else {}

    volume = generate(pipe, volume_size=(8, 8, 8), window_size=8, callback_on_step_end=callback,
                      callback_on_step_end_tensor_inputs=["latents", "noise_pred"])  # fmt: skip
    assert seen == [(step, ["latents", "noise_pred"]) for step in range(4)]
    reference = generate(pipeline(), volume_size=(8, 8, 8), window_size=8)
    assert (volume - reference).abs().max() > 1e-3  # the replaced state changed the last step
    with pytest.raises(ValueError, match="subset"):
        generate(pipe, volume_size=(8, 8, 8), window_size=8, callback_on_step_end_tensor_inputs=["anatomy"])
