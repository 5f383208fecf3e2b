"""PatchSlidingWindowPipeline with a PatchControlNet3DModel: a new ControlNet changes nothing, a trained one does,
and the pipeline saves and loads with it."""

import pytest
import torch
from diffusers import DDPMScheduler

from meddiffusers import PatchControlNet3DModel, PatchSlidingWindowPipeline
from tests.models.controlnets.test_controlnet_patch_3d import perturb, tiny_unet

VOLUME = (16, 8, 16)  # three windows of 8³ at overlap 0.5 along D and W each: several windows per step


def run(pipe, condition, **kwargs):
    """A two-step sample of the multi-window volume, always from the same noise."""
    output = pipe(
        "Chest", volume_size=VOLUME, controlnet_cond=condition, window_size=8, overlap=0.5, num_inference_steps=2,
        generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs,
    )  # fmt: skip
    return output.volumes


@pytest.fixture(scope="module")
def parts():
    """A tiny anatomy-conditioned U-Net, a scheduler, a condition and anatomy labels of the volume."""
    unet = tiny_unet(anatomy_encoding="label_map", num_anatomy_classes=3)
    scheduler = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")
    torch.manual_seed(4)
    condition = torch.rand(*VOLUME) * 2 - 1
    anatomy = torch.randint(0, 4, VOLUME)
    return unet, scheduler, condition, anatomy


def pipeline(unet, scheduler, controlnet=None):
    """The sliding-window pipeline without a progress bar."""
    pipe = PatchSlidingWindowPipeline(unet, scheduler, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_new_controlnet_gives_exactly_the_plain_volume(parts):
    unet, scheduler, condition, anatomy = parts
    plain = run(pipeline(unet, scheduler), None, anatomy=anatomy)
    controlnet = PatchControlNet3DModel.from_unet(unet)
    controlled = run(pipeline(unet, scheduler, controlnet), condition, anatomy=anatomy)
    assert plain.shape == (1, 1, *VOLUME)
    torch.testing.assert_close(controlled, plain, atol=0, rtol=0)


def test_a_trained_controlnet_changes_the_volume_and_follows_the_scale(parts):
    unet, scheduler, condition, anatomy = parts
    plain = run(pipeline(unet, scheduler), None, anatomy=anatomy)
    pipe = pipeline(unet, scheduler, perturb(PatchControlNet3DModel.from_unet(unet)).eval())
    controlled = run(pipe, condition, anatomy=anatomy)
    assert (controlled - plain).abs().max() > 1e-3
    off = run(pipe, condition, anatomy=anatomy, controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(off, plain, atol=1e-6, rtol=0)


def test_the_pipeline_saves_and_loads_with_its_controlnet(parts, tmp_path):
    unet, scheduler, condition, _ = parts
    pipe = pipeline(unet, scheduler, perturb(PatchControlNet3DModel.from_unet(unet)).eval())
    before = run(pipe, condition[None, None])
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = PatchSlidingWindowPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.controlnet, PatchControlNet3DModel)
    # Same weights; freshly loaded tensors may take other CPU kernel paths, hence float32 rounding, not bits.
    torch.testing.assert_close(run(loaded, condition[None, None]), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="controlnet_cond"):
        run(loaded, torch.zeros(8, 8, 8))
