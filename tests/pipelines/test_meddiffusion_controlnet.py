"""MedDiffusionControlNetPipeline: conditions in image or latent space, scale, checks, save/load."""

import json

import numpy as np
import pytest
import torch

from meddiffusers import (
    ControlNet3DModel,
    MedDiffusionControlNetPipeline,
    NiftiVolume,
    PercentileScaling,
    load_nifti,
)
from meddiffusers.io import affine_from_tensor_spacing
from tests.conftest import FIXTURES
from tests.pipelines.test_meddiffusion import VOLUME, build_pipeline

CONTROL = FIXTURES / "controlnet_tiny"


@pytest.fixture(scope="module")
def pipe():
    base = build_pipeline()
    controlnet = ControlNet3DModel.from_single_file(
        CONTROL / "controlnet_tiny.pt", original_config=CONTROL / "config.json"
    )
    pipeline = MedDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def condition():
    volume = load_nifti(FIXTURES.parent.parent / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz")
    return PercentileScaling()(volume.tensor)[:, :, :32, 32:96, 32:96]


def sample(pipeline, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipeline(num_inference_steps=3, generator=generator, output_type="pt", **kwargs).volumes


def test_image_space_condition_guides_generation(pipe, condition):
    guided = sample(pipe, region="CTLegs", condition=condition)
    assert guided.shape == (1, 1, *VOLUME) and torch.isfinite(guided).all()
    base = build_pipeline()
    plain = base(
        "CTLegs",
        volume_size=VOLUME,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).volumes
    off = sample(pipe, region="CTLegs", condition=condition, controlnet_conditioning_scale=0.0)
    torch.testing.assert_close(off, plain, atol=1e-4, rtol=0)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_latent_space_condition_and_batches(pipe, condition):
    with torch.no_grad():
        latent = pipe.vqvae.normalize_latents(pipe.vqvae.encode(condition).latents)
    from_latent = sample(pipe, region="CTLegs", condition=latent)
    from_image = sample(pipe, region="CTLegs", condition=condition)
    torch.testing.assert_close(from_latent, from_image)
    two = pipe(region=["CTLegs", "MRBrain"], condition=latent, num_inference_steps=2, output_type="np")
    assert two.volumes.shape == (2, 1, *VOLUME)


def test_bad_conditions_fail_before_sampling(pipe, condition):
    with pytest.raises(ValueError, match="`condition` is required"):
        pipe("CTLegs")
    with pytest.raises(ValueError, match="channels"):
        pipe("CTLegs", condition=torch.zeros(1, 3, 32, 64, 64))
    with pytest.raises(ValueError, match="multiples of the autoencoder patch size"):
        pipe("CTLegs", condition=condition[:, :, :30])
    with pytest.raises(ValueError, match="NaN"):
        pipe("CTLegs", condition=torch.full((1, 1, 32, 64, 64), float("nan")))
    wrong_spacing = NiftiVolume(condition, affine_from_tensor_spacing((3.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match="spacing"):
        pipe("CTLegs", condition=wrong_spacing)
    right_spacing = NiftiVolume(condition, affine_from_tensor_spacing((1.25, 1.25, 1.25)))
    assert sample(pipe, region="CTLegs", condition=right_spacing).shape == (1, 1, *VOLUME)


def test_save_and_load(pipe, condition, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["controlnet"] == ["meddiffusers", "ControlNet3DModel"]
    loaded = MedDiffusionControlNetPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    volumes = loaded("CTLegs", condition=condition, num_inference_steps=2, output_type="np").volumes
    assert volumes.shape == (1, 1, *VOLUME) and np.isfinite(volumes).all()
