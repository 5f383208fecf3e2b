"""examples/train_gem3d.py on CPU: the three GEM-3D stages on crops of a real MR volume and its label, exact resume,
stage 2 training only the slice-axis layers, two processes, the data preparation and the timestep draws."""

import json
import re
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from meddiffusers.models.unets.unet_gem3d import GEM3DUNetModel
from meddiffusers.pipelines.gem3d import GEM3DVolumePipeline, encode_slices, resize_slices
from meddiffusers.training.gem3d_data import (
    GEM3DPreprocessor,
    GEM3DVolumes,
    cache_moments,
    check_cache,
    draw_chunk,
    encode_moments,
    read_labelled_manifest,
    sample_latents,
    stage2_timestep_weights,
)
from tests.conftest import FIXTURES
from tests.examples.utils import EXAMPLES, run

SCRIPT = str(EXAMPLES / "train_gem3d.py")
DATA = FIXTURES / "gem3d_train"
MANIFEST = DATA / "manifest.json"
UNET = {"block_out_channels": [8, 16], "layers_per_block": 1, "attention_levels": [False, True]}
UNET |= {"attention_head_dim": 8, "norm_num_groups": 4, "num_frames": 4}
SLICE_UNET = {"block_out_channels": [8, 16], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}
SLICE_UNET |= {"up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1, "sample_size": 8}
SLICE_UNET |= {"attention_head_dim": [1, 2], "cross_attention_dim": 16, "norm_num_groups": 4}
TINY = ["--train_data", str(MANIFEST), "--resolution", "16", "--num_frames", "4", "--report_to", "none"]
TINY += ["--learning_rate", "1e-3", "--no-scale_lr", "--seed", "5", "--validation_inference_steps", "2"]


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return AutoencoderKL(block_out_channels=(8, 8), **blocks, norm_num_groups=4, layers_per_block=1, sample_size=16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny KL VAE (factor 2, 4 latent channels, scaling 0.18215) and tiny U-Net configs."""
    folder = tmp_path_factory.mktemp("models")
    tiny_vae().save_pretrained(folder / "vae")
    (folder / "unet.json").write_text(json.dumps(UNET))
    (folder / "slice_unet.json").write_text(json.dumps(SLICE_UNET))
    return folder


def train(output, *extra, launcher=(sys.executable,), env=None):
    return run(*launcher, SCRIPT, "--output_dir", str(output), *TINY, *extra, env=env)


def weights(output, subfolder="unet"):
    return load_file(output / subfolder / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def stage1(models, tmp_path_factory):
    """Stage 1, 4 steps of 2 micro-steps each in one run, with cached latents and the validation volume."""
    output = tmp_path_factory.mktemp("stage1")
    common = [
        "--stage",
        "slice2d",
        "--pretrained_vae",
        str(models / "vae"),
        "--unet_config",
        str(models / "unet.json"),
    ]
    common += ["--gradient_accumulation_steps", "2", "--checkpointing_steps", "2", "--cache_latents"]
    result = train(output, *common, "--max_train_steps", "4", "--checkpoints_total_limit", "1")
    return SimpleNamespace(output=output, common=common, result=result)


def test_stage1_resumed_run_ends_with_the_same_weights(stage1, tmp_path):
    """2 steps, then a resume to 4 (reusing the latent cache), equal the uninterrupted 4 steps bit for bit; the EMA
    weights are what the pipeline saves, and the validation volume is a NIfTI on the mask's grid."""
    resumed = tmp_path / "resumed"
    train(resumed, *stage1.common, "--max_train_steps", "2", "--no-validate_at_end")
    result = train(resumed, *stage1.common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert "Encoding 2 volumes" not in result.stderr  # the cache of the first part is reused
    first, second = weights(stage1.output), weights(resumed)
    assert first.keys() == second.keys() and not any("temporal" in key for key in first)
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert sorted(p.name for p in stage1.output.glob("checkpoint-*")) == ["checkpoint-4"]
    # The saved U-Net holds the EMA weights (decay warm-up min(0.9999, (1 + n) / (10 + n))), not the raw ones.
    raw = load_file(stage1.output / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(raw[key], first[key]) for key in first)
    saved_raw = weights(stage1.output, "unet_raw")  # the raw weights, what the original samples with
    assert saved_raw.keys() == raw.keys() and all(torch.equal(saved_raw[key], raw[key]) for key in raw)
    loss = float(re.search(r"last loss (\S+)", stage1.result.stderr)[1])
    assert 0.3 < loss < 3  # an L2 loss of unit-variance noise against a fresh model's prediction

    label = nib.load(DATA / "brain1_a_label.nii.gz")
    canonical = nib.as_closest_canonical(label)
    volume = nib.load(stage1.output / "validation" / "step-4" / "volume.nii.gz")
    mask = nib.load(stage1.output / "validation" / "step-4" / "mask.nii.gz")
    assert volume.shape == label.shape == (32, 40, 25)
    np.testing.assert_allclose(volume.affine, canonical.affine)
    np.testing.assert_array_equal(mask.get_fdata(), canonical.get_fdata())
    assert -1 <= volume.get_fdata().min() < volume.get_fdata().max() <= 1

    pipe = GEM3DVolumePipeline.from_pretrained(stage1.output)
    assert not pipe.unet.config.temporal_layers and pipe.slice_unet is None
    assert pipe.config.resolution == 16 and pipe.config.max_label == 3
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1


def test_stage2_on_two_processes_trains_only_the_slice_axis_layers_then_the_slice_generator(stage1, models, tmp_path):
    """Stage 2 (two processes, checkpoint limit) starts from stage 1: every 2-D weight stays bit-identical, the
    temporal ones move; the slice generator is then added to the stage-2 pipeline without touching its U-Net."""
    stage2 = tmp_path / "stage2"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    result = train(
        stage2, "--stage", "volume3d", "--pretrained_pipeline", str(stage1.output), "--max_train_steps", "3",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--no-validate_at_end", "--scale_lr",
        launcher=launcher, env={"ACCELERATE_USE_CPU": "1"},
    )  # fmt: skip
    assert result.stderr.count("Saved the pipeline") == 1  # one run over two ranks
    assert "lr 0.002" in result.stderr  # scaled by the two processes
    assert sorted(p.name for p in stage2.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (stage2 / "checkpoint-3" / "random_states_1.pkl").is_file()
    assert not list(stage2.glob("checkpoint-3/custom_checkpoint_*"))  # no EMA in stage 2
    before, after = weights(stage1.output), weights(stage2)
    temporal = [key for key in after if "temporal" in key]
    assert sorted(set(after) - set(temporal)) == sorted(before) and temporal
    for key in before:
        assert torch.equal(before[key], after[key]), key
    # AdamW moves every trainable weight (weight decay) and the gradient reaches the frame convolutions.
    initial = GEM3DUNetModel.from_stage1(GEM3DUNetModel.from_pretrained(stage1.output, subfolder="unet"))
    initial = initial.state_dict()
    assert [key for key in temporal if not torch.equal(initial[key], after[key])] == temporal
    conv = "conv_in_temporal.temporal_conv.weight"
    assert (after[conv] - initial[conv]).abs().max() > 1e-3  # more than the weight decay's 3 * lr * 0.01 * |w|

    final = tmp_path / "gem3d"
    result = train(
        final, "--stage", "informed_slice", "--pretrained_pipeline", str(stage2),
        "--slice_unet_config", str(models / "slice_unet.json"), "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--train_batch_size", "2",
    )  # fmt: skip
    assert "lr 0.001" in result.stderr
    for key, value in weights(stage2).items():
        assert torch.equal(weights(final)[key], value), key
    pipe = GEM3DVolumePipeline.from_pretrained(final)
    assert pipe.unet.config.temporal_layers and pipe.slice_unet.config.cross_attention_dim == 16
    slices = nib.load(final / "validation" / "step-2" / "informed_slices.nii.gz")
    assert slices.shape == (16, 16, 4)  # four generated slices at the model resolution
    assert (final / "validation" / "step-2" / "volume.nii.gz").is_file()  # and a volume from a generated slice


def test_preprocessing_is_the_originals_min_max_and_label_scaling():
    entries = read_labelled_manifest(MANIFEST)
    item = GEM3DPreprocessor(max_label=3)(entries[0]["image"], entries[0]["label"])
    image = nib.as_closest_canonical(nib.load(DATA / "brain1_a.nii.gz")).get_fdata()
    label = nib.as_closest_canonical(nib.load(DATA / "brain1_a_label.nii.gz")).get_fdata()
    expected = (image - image.min()) / (image.max() - image.min()) * 2 - 1
    # (x, y, z) files to (1, S, H, W) tensors, slices along z.
    np.testing.assert_allclose(item["image"][0].numpy(), expected.transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(item["mask"][0].numpy(), label.transpose(2, 0, 1) * 2 / 3 - 1, atol=1e-7)
    assert torch.equal(item["mask"].unique(), torch.tensor([0.0, 1.0]) / 3 * 2 - 1)


def test_bad_manifests_and_labels_are_rejected(tmp_path):
    (tmp_path / "m.json").write_text(json.dumps([{"image": str(DATA / "brain1_a.nii.gz")}, {"label": "no.nii.gz"}]))
    with pytest.raises(ValueError, match=r"3 problem\(s\): entry 0: no 'label'; entry 1: no 'image'; entry 1: file"):
        read_labelled_manifest(tmp_path / "m.json")
    label = nib.load(DATA / "brain1_a_label.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj) * 5, label.affine), tmp_path / "five.nii.gz")
    with pytest.raises(ValueError, match=r"five.nii.gz.*labels must lie in \[0, 3\]"):
        GEM3DPreprocessor(max_label=3).load(str(DATA / "brain1_a.nii.gz"), str(tmp_path / "five.nii.gz"))
    with pytest.raises(ValueError, match="label grid"):
        GEM3DPreprocessor().load(str(DATA / "brain1_a.nii.gz"), str(DATA / "brain1_b_label.nii.gz"))


def test_cached_moments_give_the_pipelines_posterior_sample(tmp_path):
    """A latent drawn from cached moments is the pipeline's VAE encoding with the same posterior noise."""
    vae = tiny_vae().eval()
    entries = read_labelled_manifest(MANIFEST)
    dataset = GEM3DVolumes(entries, GEM3DPreprocessor())
    assert not check_cache(str(tmp_path / "cache"), vae, (16, 16), dataset)
    cache_moments(vae, dataset, str(tmp_path / "cache"), (16, 16), chunk=7)
    assert check_cache(str(tmp_path / "cache"), vae, (16, 16), dataset)
    with pytest.raises(ValueError, match="other resolution"):
        check_cache(str(tmp_path / "cache"), vae, (32, 32), dataset)
    cached = GEM3DVolumes(cache=str(tmp_path / "cache"))[1]["image_moments"]
    assert cached.shape == (20, 8, 8, 8)
    slices = dataset[1]["image"].transpose(0, 1)  # (S, 1, H, W)
    torch.testing.assert_close(cached, encode_moments(vae, slices, (16, 16)), atol=1e-6, rtol=0)
    latents = sample_latents(cached, torch.Generator().manual_seed(3), vae.config.scaling_factor)
    noise = torch.randn((20, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    resized = resize_slices(slices[None].transpose(1, 2), (16, 16), mode="bilinear")[0].transpose(0, 1)
    with torch.no_grad():
        expected = encode_slices(vae, resized, noise)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)


def test_chunks_cover_every_start_and_the_informed_slice_lies_inside():
    generator = torch.Generator().manual_seed(0)
    draws = [draw_chunk(6, 4, generator) for _ in range(300)]
    assert {start for start, _ in draws} == {0, 1, 2}  # the last chunk [2, 6) too (the original skips it)
    assert all(start <= informed < start + 4 for start, informed in draws)
    assert draw_chunk(4, 4, generator)[0] == 0
    with pytest.raises(ValueError, match="shorter than one 4-slice"):
        draw_chunk(3, 4, generator)


def _script():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import train_gem3d
    finally:
        sys.path.remove(str(EXAMPLES))
    return train_gem3d


class _Recorder(torch.nn.Module):
    """A stand-in U-Net that records its inputs and predicts zeros."""

    def forward(self, sample, timestep, **kwargs):
        self.sample, self.timestep = sample, timestep
        return SimpleNamespace(sample=torch.zeros_like(sample[:, :4]))


def test_stage_timestep_draws():
    """Stage 2: one timestep per chunk with weights 2000 - t (mean 443.96, not 499.5); stage 1: one per slice."""
    script = _script()
    from diffusers import DDPMScheduler

    weights = stage2_timestep_weights(1000)
    assert weights[0] == 2000 and weights[999] == 1001 and weights.shape == (1000,)
    t = torch.arange(1000.0)
    expected_mean = float((t * weights).sum() / weights.sum())
    assert abs(expected_mean - 666166500 / 1500500) < 1e-3  # sum t(2000 - t) / sum (2000 - t) = 443.96
    scheduler = DDPMScheduler.from_config({**script.GEM3D_DDIM_CONFIG})
    accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    model = _Recorder()
    batch = {"latents": torch.randn(4000, 4, 2, 1, 1), "condition": torch.randn(4000, 8, 2, 1, 1)}
    args = SimpleNamespace(stage="volume3d", loss_type="l2", seed=1, timestep_weighting="reference")
    loss = script.training_loss(args, model, batch, scheduler, 0, accelerator)
    assert model.timestep.shape == (4000,) and model.sample.shape == (4000, 12, 2, 1, 1)
    assert abs(model.timestep.float().mean() - expected_mean) < 15  # 3 standard errors
    # The loss is the mean squared noise (zero prediction) of exactly what was added.
    alphas = scheduler.alphas_cumprod[model.timestep].view(-1, 1, 1, 1, 1)
    noise = (model.sample[:, :4] - alphas.sqrt() * batch["latents"]) / (1 - alphas).sqrt()
    torch.testing.assert_close(loss, noise.pow(2).mean(), atol=1e-4, rtol=1e-4)

    args.stage = "slice2d"
    batch = {"latents": torch.randn(2, 4, 5, 2, 2), "condition": torch.randn(2, 8, 5, 2, 2)}
    script.training_loss(args, model, batch, scheduler, 0, accelerator)
    assert model.sample.shape == (10, 12, 1, 2, 2) and model.timestep.shape == (10,)
    torch.testing.assert_close(model.sample[3, 4:, 0], batch["condition"][0, :, 3])  # slice 3 of chunk 0
    assert len(set(model.timestep.tolist())) > 5
