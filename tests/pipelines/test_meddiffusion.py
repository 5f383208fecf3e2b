"""MedDiffusionPipeline: parity with the original sampler and decoder, loading, schedulers, regions and outputs."""

import json

import nibabel as nib
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

from meddiffusers import (
    BiFlowNet3DModel,
    MedDiffusionDDIMScheduler,
    MedDiffusionPipeline,
    VQModel3D,
    meddiffusion_cosine_betas,
)
from tests.conftest import FIXTURES

VOLUME = (32, 64, 64)  # latent (8, 16, 16) of the 4x autoencoder


@pytest.fixture(scope="module")
def unet_ref():
    return load_file(FIXTURES / "biflownet_tiny" / "inputs_outputs.safetensors")


@pytest.fixture(scope="module")
def pipeline_ref():
    return load_file(FIXTURES / "pipeline_tiny" / "inputs_outputs.safetensors")


def build_pipeline(scheduler=None):
    folder = FIXTURES / "biflownet_tiny"
    unet = BiFlowNet3DModel.from_single_file(folder / "biflownet_tiny.pt", original_config=folder / "config.json")
    vqvae = VQModel3D.from_single_file(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt")
    pipe = MedDiffusionPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler or MedDiffusionDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return build_pipeline()


def test_ddim_replay_reproduces_the_original_sampler(pipe, unet_ref):
    steps = {}

    def keep_latents(pipeline, step, timestep, kwargs):
        steps[step] = kwargs["latents"].clone()
        return {}

    output = pipe(
        region="CTLegs",
        latents=unet_ref["ddim_z"],
        volume_size=VOLUME,
        num_inference_steps=100,
        output_type="latent",
        callback_on_step_end=keep_latents,
    )
    assert pipe.get_region("CTLegs").class_id == int(unet_ref["ddim_y"])
    torch.testing.assert_close(steps[0], unet_ref["ddim_x_after_step1"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(steps[1], unet_ref["ddim_x_after_step2"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(output.volumes, unet_ref["ddim_sample"], atol=5e-3, rtol=0)


def test_ddpm_replay_with_the_recorded_noises(unet_ref, monkeypatch):
    """The original DDPM sampler = diffusers' DDPMScheduler with the exact betas, clipping, fixed-small variance."""
    scheduler = DDPMScheduler(
        num_train_timesteps=20,
        trained_betas=meddiffusion_cosine_betas(20).tolist(),
        variance_type="fixed_small",
        clip_sample=True,
    )
    pipe = build_pipeline(scheduler)
    recorded = iter(unet_ref["ddpm20_step_noises"])
    monkeypatch.setattr(
        "diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda shape, **kwargs: next(recorded).reshape(shape)
    )
    output = pipe(
        region=2, latents=unet_ref["ddpm20_z"], volume_size=VOLUME, num_inference_steps=20, output_type="latent"
    )
    torch.testing.assert_close(output.volumes, unet_ref["ddpm20_sample"], atol=1e-3, rtol=0)


def test_decoding_reproduces_the_original_pipeline_tail(pipe, pipeline_ref):
    sample = pipeline_ref["diffusion_sample"]
    with torch.no_grad():
        denormalized = pipe.vqvae.denormalize_latents(sample)
        decoded = pipe.decode_latents(sample)
    torch.testing.assert_close(denormalized, pipeline_ref["latent_denormalized"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded, pipeline_ref["decoded_volume"], atol=1e-4, rtol=1e-4)


def test_nifti_output_has_the_original_array_order_and_region_spacing(pipe, pipeline_ref, monkeypatch):
    monkeypatch.setattr(pipe, "decode_latents", lambda latents: pipeline_ref["decoded_volume"])
    output = pipe(region="CTLegs", volume_size=VOLUME, num_inference_steps=2, output_type="nifti")
    image = output.volumes[0]
    np.testing.assert_array_equal(np.asarray(image.dataobj), pipeline_ref["nifti_array_CXYZ"][0].numpy())
    assert image.header.get_zooms() == (1.25, 1.25, 1.25)


def test_region_names_aliases_and_errors(pipe):
    assert pipe.get_region("CTLegs") == pipe.get_region("CTLowerLimb") == pipe.get_region(2)
    assert pipe.get_region("MRBrain").name == "MRBrainT1" == pipe.get_region("mr brain t1").name
    with pytest.raises(ValueError, match="Unknown region 'Liver'.*MRBrainT1.*MRKnee"):
        pipe(region="Liver", num_inference_steps=1)


@pytest.mark.parametrize(
    "scheduler_cls",
    [
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
    ],
)
def test_any_diffusers_scheduler_plugs_in(pipe, scheduler_cls):
    pipe = MedDiffusionPipeline(**pipe.components, regions=pipe.config.regions)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run():
        generator = torch.Generator().manual_seed(0)
        return pipe("MRBrain", num_inference_steps=3, volume_size=VOLUME, generator=generator, output_type="pt")

    first, second = run(), run()
    assert first.volumes.shape == (1, 1, *VOLUME)
    assert torch.isfinite(first.volumes).all()
    assert torch.equal(first.volumes, second.volumes)


def test_batches_generators_and_outputs(pipe, tmp_path):
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    output = pipe(
        region=["MRBrain", "CTLegs"], volume_size=VOLUME, num_inference_steps=2, generator=generators, output_type="np"
    )
    assert isinstance(output.volumes, np.ndarray) and output.volumes.shape == (2, 1, *VOLUME)
    assert output.regions == ["MRBrainT1", "CTLowerLimb"]
    assert output.affines.shape == (2, 4, 4)
    single = pipe(
        region="CTLegs", volume_size=VOLUME, num_inference_steps=2, generator=torch.Generator().manual_seed(2)
    )
    np.testing.assert_allclose(output.volumes[1], single.volumes[0], atol=1e-4, rtol=0)

    paths = output.save(tmp_path / "volumes")
    assert [p.split("/")[-1] for p in paths] == ["MRBrainT1_0.nii.gz", "CTLowerLimb_1.nii.gz"]
    image = nib.load(paths[1])
    assert image.shape == (VOLUME[1], VOLUME[2], VOLUME[0])
    assert image.header.get_zooms() == (1.25, 1.25, 1.25)
    volumes, affines, regions = pipe("MRBrain", volume_size=VOLUME, num_inference_steps=1, return_dict=False)
    assert volumes.shape == (1, 1, *VOLUME) and regions == ["MRBrainT1"]


def test_callback_can_change_latents_and_interrupt(pipe):
    calls = []

    def callback(pipeline, step, timestep, kwargs):
        calls.append(int(timestep))
        if step == 1:
            pipeline._interrupt = True
        return {"latents": torch.zeros_like(kwargs["latents"])}

    output = pipe(
        "MRBrain", volume_size=VOLUME, num_inference_steps=5, output_type="latent", callback_on_step_end=callback
    )
    assert len(calls) == 2
    assert torch.count_nonzero(output.volumes) == 0


def test_bad_inputs_fail_before_sampling(pipe):
    with pytest.raises(ValueError, match="divisible by 32"):
        pipe("MRBrain", volume_size=(30, 64, 64), num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe("MRBrain", volume_size=VOLUME, output_type="png")
    with pytest.raises(ValueError, match="must have shape"):
        pipe("MRBrain", volume_size=VOLUME, latents=torch.zeros(1, 4, 8, 8, 8), num_inference_steps=1)
    with pytest.raises(ValueError, match="NaN"):
        pipe("MRBrain", volume_size=VOLUME, latents=torch.full((1, 4, 8, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="different default sizes"):
        pipe(["MRBrain", "MRKnee"], num_inference_steps=1)


def test_save_and_load_by_path_and_by_hub_repo_id(pipe, tmp_path):
    from tests.hub_cache import populate_hub_cache

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vqvae"] == ["meddiffusers", "VQModel3D"]
    assert index["unet"] == ["meddiffusers", "BiFlowNet3DModel"]
    assert index["scheduler"] == ["meddiffusers", "MedDiffusionDDIMScheduler"]
    assert [r["name"] for r in index["regions"]][:3] == ["CTHeadNeck", "CTChestAbdomen", "CTLowerLimb"]

    def assert_same_pipeline(loaded):
        for name in ("vqvae", "unet"):
            expected, actual = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
            assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
        assert type(loaded.scheduler) is type(pipe.scheduler)
        torch.testing.assert_close(loaded.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod, atol=0, rtol=0)
        assert loaded.config.regions == pipe.config.regions
        loaded.set_progress_bar_config(disable=True)
        # The first DDIM step divides by sqrt(alpha_bar_999) ~ 1.6e-5, so last-bit differences between two loads of
        # the same weights are amplified; compare a short sampling run loosely and the denoiser tightly.
        x = torch.randn(1, 4, 8, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(loaded.unet(x, 500, 2).sample, pipe.unet(x, 500, 2).sample, atol=1e-5, rtol=0)
        volumes = loaded(
            "CTLegs", volume_size=VOLUME, num_inference_steps=2, generator=torch.Generator().manual_seed(3)
        )
        assert volumes.volumes.shape == (1, 1, *VOLUME) and np.isfinite(volumes.volumes).all()

    assert_same_pipeline(MedDiffusionPipeline.from_pretrained(tmp_path / "pipe"))
    populate_hub_cache(tmp_path / "pipe", "meddiffusers-test/tiny-pipeline", tmp_path / "hub")
    hub = MedDiffusionPipeline.from_pretrained("meddiffusers-test/tiny-pipeline", cache_dir=tmp_path / "hub")
    assert_same_pipeline(hub)
    assert hub.get_region("CTLegs").spacing == (1.25, 1.25, 1.25)


def test_custom_regions_are_saved_configuration(pipe, tmp_path):
    regions = [
        {"name": "Liver", "class_id": 0, "aliases": ["CTLiver"], "volume_size": [32, 64, 64], "spacing": [2, 1, 1]},
        {"name": "Spleen", "class_id": 1, "volume_size": [32, 64, 64]},
    ]
    custom = MedDiffusionPipeline(**pipe.components, regions=regions)
    custom.save_pretrained(tmp_path)
    reloaded = MedDiffusionPipeline.from_pretrained(tmp_path)
    assert reloaded.get_region("ctliver").class_id == 0
    with pytest.raises(ValueError, match="Liver.*Spleen"):
        reloaded.get_region("MRBrain")


def test_large_latents_switch_to_exact_slab_decoding(pipe, monkeypatch):
    """Above the threshold the pipeline decodes slab by slab: the same volume as the full decode, and afterwards the
    autoencoder is back in its own mode."""
    latents = torch.rand(1, 4, 8, 16, 16) * 2 - 1
    full = pipe.decode_latents(latents)  # 8 * 16 * 16 latent voxels: not above the default threshold
    seen = {}
    original = pipe.vqvae.slab_decode

    def spy(latents, **kwargs):
        seen["slab"] = True
        return original(latents, **kwargs)

    monkeypatch.setattr(pipe.vqvae, "slab_decode", spy)
    threshold = pipe.config.tiled_decode_threshold
    pipe.register_to_config(tiled_decode_threshold=8**3)
    try:
        volumes = pipe.decode_latents(latents)
    finally:
        pipe.register_to_config(tiled_decode_threshold=threshold)
    assert seen.get("slab") and volumes.shape == (1, 1, *VOLUME)
    torch.testing.assert_close(volumes, full, atol=1e-5, rtol=0)
    assert not pipe.vqvae.use_slab_decoding and not pipe.vqvae.use_tiling
