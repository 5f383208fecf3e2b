"""examples/train_vqmodel3d.py on CPU; the whole recipe: patch stage → joint stage → latents → BiFlowNet → NIfTI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import MedDiffusionPipeline, VQModel3D, load_nifti, save_nifti
from meddiffusers.training.data import VolumeDataset, VolumePreprocessor, read_manifest
from meddiffusers.training.vq_losses import VGG16Features

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
VOLUME = str(EXAMPLES / "data" / "mr_t1_itk_kmeanstest.nii.gz")
TINY_AE = ["--block_out_channels", "4", "8", "--latent_channels", "4", "--num_vq_embeddings", "32"]
TINY_AE += ["--norm_num_groups", "2", "--patch_size", "16", "--disc_channels", "4", "--disc_layers", "2"]
TINY_AE += ["--report_to", "none"]
TINY_UNET = ["--base_channels", "6", "--channel_mults", "1", "1", "2", "4", "--attention_levels", "0", "0", "1", "1"]
TINY_UNET += ["--attention_heads", "2", "--norm_num_groups", "2", "--dit_num_heads", "2", "--report_to", "none"]


def run(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("manifest")
    rows = [{"image": VOLUME, "region": "MRBrain"}, {"image": VOLUME, "region": "MRKnee"}]
    (folder / "manifest.json").write_text(json.dumps(rows))
    return folder / "manifest.json"


def reconstruction_error(model, volume):
    with torch.no_grad():
        return (model(volume).sample - volume).abs().mean().item()


def test_whole_recipe_from_nifti_to_generated_volume(manifest, tmp_path):
    """Stage patch (with the discriminator switched on) → stage joint → cached latents → BiFlowNet → a NIfTI."""
    run(
        "train_vqmodel3d.py",
        "--stage",
        "patch",
        "--train_data",
        manifest,
        "--output_dir",
        tmp_path / "s1",
        "--max_train_steps",
        4,
        "--disc_start_step",
        2,
        *TINY_AE,
    )
    run(
        "train_vqmodel3d.py",
        "--stage",
        "joint",
        "--pretrained_vqvae",
        tmp_path / "s1" / "vqvae",
        "--train_data",
        manifest,
        "--output_dir",
        tmp_path / "s2",
        "--crop_size",
        32,
        64,
        64,
        "--max_train_steps",
        2,
        *TINY_AE,
    )
    stage1 = VQModel3D.from_pretrained(tmp_path / "s1" / "vqvae").state_dict()
    stage2 = VQModel3D.from_pretrained(tmp_path / "s2" / "vqvae").state_dict()
    assert all(torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith(("encoder.", "quantize.")))
    assert any(not torch.equal(stage1[k], stage2[k]) for k in stage1 if k.startswith("decoder."))

    run(
        "cache_latents.py",
        "--pretrained_vqvae",
        tmp_path / "s2" / "vqvae",
        "--train_data",
        manifest,
        "--output_dir",
        tmp_path / "latents",
        "--volume_size",
        32,
        64,
        64,
    )
    run(
        "train_biflownet.py",
        "--train_latents",
        tmp_path / "latents",
        "--pretrained_vqvae",
        tmp_path / "s2" / "vqvae",
        "--output_dir",
        tmp_path / "unet",
        "--max_train_steps",
        2,
        *TINY_UNET,
    )
    pipe = MedDiffusionPipeline.from_pretrained(tmp_path / "unet" / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    path = pipe("MRKnee", volume_size=(32, 64, 64), num_inference_steps=3).save(tmp_path / "knee.nii.gz")[0]
    image = nib.load(path)
    assert image.shape == (64, 64, 32) and np.isfinite(image.get_fdata()).all()


def test_reconstruction_loss_goes_down_on_a_real_volume(tmp_path):
    source = load_nifti(VOLUME)
    crop = source.tensor[:, :, 16:48, 40:72, 40:72]  # a 32³ block of the head
    save_nifti(crop, tmp_path / "crop.nii.gz", affine=source.affine)
    (tmp_path / "crop.json").write_text(json.dumps([{"image": str(tmp_path / "crop.nii.gz")}]))
    run(
        "train_vqmodel3d.py",
        "--stage",
        "patch",
        "--train_data",
        tmp_path / "crop.json",
        "--output_dir",
        tmp_path / "ae",
        "--max_train_steps",
        80,
        "--learning_rate",
        3e-3,
        "--crop_size",
        32,
        "--no_augmentation",
        "--disc_start_step",
        1000,
        "--checkpointing_steps",
        1,
        "--checkpoints_total_limit",
        1000,
        *TINY_AE,
    )
    trained = VQModel3D.from_pretrained(tmp_path / "ae" / "vqvae").eval()
    early = VQModel3D.from_config(trained.config).eval()
    early.load_state_dict(load_file(tmp_path / "ae" / "checkpoint-1" / "model.safetensors"))
    volume = VolumePreprocessor()(str(tmp_path / "crop.nii.gz"))[None]  # what training saw: reoriented to RAS, scaled
    before, after = reconstruction_error(early, volume), reconstruction_error(trained, volume)
    print(f"mean |reconstruction - input| on a real MRI block: after 1 step {before:.3f}, after 80 steps {after:.3f}")
    assert after < 0.75 * before


def test_perceptual_loss_uses_local_weights_only(manifest, tmp_path):
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in VGG16Features().features.state_dict().items()}, tmp_path / "vgg.pth")
    result = run(
        "train_vqmodel3d.py",
        "--stage",
        "patch",
        "--train_data",
        manifest,
        "--output_dir",
        tmp_path / "p",
        "--max_train_steps",
        1,
        "--perceptual_weights",
        tmp_path / "vgg.pth",
        *TINY_AE,
    )
    assert "perceptual loss is OFF" not in result.stderr
    result = run(
        "train_vqmodel3d.py",
        "--stage",
        "patch",
        "--train_data",
        manifest,
        "--output_dir",
        tmp_path / "q",
        "--max_train_steps",
        1,
        *TINY_AE,
    )
    assert "perceptual loss is OFF" in result.stderr
    with pytest.raises(ValueError, match="not a VGG16 weight file"):
        torch.save({"other.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        VGG16Features.from_file(tmp_path / "bad.pth")


def test_bad_manifests_and_files_are_reported_with_their_names(tmp_path):
    from meddiffusers import meddiffusion_regions

    (tmp_path / "m.json").write_text(
        json.dumps([{"image": "missing.nii.gz", "region": "MRBrain"}, {"image": VOLUME, "region": "Liver"}])
    )
    with pytest.raises(ValueError, match=r"2 problem\(s\).*missing.nii.gz.*unknown region 'Liver'"):
        read_manifest(tmp_path / "m.json", meddiffusion_regions())
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not a volume")
    (tmp_path / "ok.json").write_text(json.dumps([{"image": str(broken)}, {"image": VOLUME}, {"image": VOLUME}]))
    dataset = VolumeDataset(read_manifest(tmp_path / "ok.json"), VolumePreprocessor(multiple=16), crop_size=16)
    item = dataset[0]  # the broken file is skipped, with a warning naming it
    assert item["pixel_values"].shape == (1, 16, 16, 16) and str(broken) in dataset.failed
