"""examples/train_controlnet.py on CPU: two processes, resume, and sampling with the trained ControlNet, for the
MedDiffusion pipeline and for MedDiff-FM's patch model (super-resolution and lesion generation)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from meddiffusers import MedDiffusionControlNetPipeline, PatchControlNet3DModel, PatchSlidingWindowPipeline, save_nifti
from meddiffusers.operators import thick_slice_condition
from tests.models.unets.test_unet_patch_3d import tiny as tiny_unet
from tests.pipelines.test_meddiffusion import build_pipeline

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_controlnet.py"
VOLUME = str(ROOT / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz")


def train(
    base, output, *extra, launcher=(sys.executable,), env=None, model="pipe", size=("--volume_size", 32, 64, 64)
):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [
        *launcher,
        str(SCRIPT),
        "--pretrained_model",
        str(base / model),
        "--train_data",
        str(base / "manifest.json"),
        "--output_dir",
        str(output),
        *map(str, size),
        "--report_to",
        "none",
        *map(str, extra),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnet")
    build_pipeline().save_pretrained(folder / "pipe")
    labels = torch.zeros(1, 1, 32, 64, 64)
    labels[:, :, 8:24, 16:48, 16:48] = 1
    save_nifti(labels, folder / "mask.nii.gz")
    rows = [
        {"image": VOLUME, "region": "MRBrain", "mask": str(folder / "mask.nii.gz")},
        {"image": VOLUME, "region": "CTLegs", "mask": str(folder / "mask.nii.gz")},
    ]
    (folder / "manifest.json").write_text(json.dumps(rows))
    return folder


def test_two_processes_validation_and_sampling(base, tmp_path):
    output = tmp_path / "svct"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    result = train(
        base,
        output,
        "--condition",
        "sparse_view_ct",
        "--num_views",
        12,
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        1,
        "--checkpoints_total_limit",
        1,
        "--validation_steps",
        2,
        "--validation_inference_steps",
        2,
        "--learning_rate",
        1e-3,
        launcher=launcher,
        env={"ACCELERATE_USE_CPU": "1"},
    )
    assert result.stderr.count("Saved the ControlNet pipeline") == 1
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (output / "checkpoint-2" / "random_states_1.pkl").is_file()
    assert {p.name for p in (output / "validation" / "step-2").iterdir()} >= {"condition.nii.gz", "target.nii.gz"}
    trained = load_file(output / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert trained["controlnet_mid_block.weight"].abs().sum() > 0  # the zero convolutions have learned
    pipe = MedDiffusionControlNetPipeline.from_pretrained(output / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    condition = torch.rand(1, 1, 32, 64, 64) * 2 - 1
    path = pipe("MRBrain", condition=condition, num_inference_steps=2).save(tmp_path / "sample.nii.gz")[0]
    image = nib.load(path)
    assert image.shape == (64, 64, 32) and np.isfinite(image.get_fdata()).all()


@pytest.mark.parametrize("condition", ["undersampled_mri", "mask"])
def test_resume_gives_the_same_controlnet(base, tmp_path, condition):
    common = ["--condition", condition, "--checkpointing_steps", 1, "--learning_rate", 1e-3, "--seed", 1]
    train(base, tmp_path / "straight", *common, "--max_train_steps", 3)
    train(base, tmp_path / "resumed", *common, "--max_train_steps", 2)
    train(base, tmp_path / "resumed", *common, "--max_train_steps", 3, "--resume_from_checkpoint", "latest")
    straight = load_file(tmp_path / "straight" / "controlnet" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "controlnet" / "diffusion_pytorch_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-6, msg=key)


# ---------------------------------------------------------------------------------------------- MedDiff-FM patches

PATCH_VOLUME = (20, 16, 16)  # 1 mm voxels (the regions' spacing): no resampling; 8³ training patches


@pytest.fixture(scope="module")
def patch_base(tmp_path_factory):
    """A tiny anatomy-conditioned patch pipeline and two CT volumes (HU) with lesion masks and anatomy labels."""
    folder = tmp_path_factory.mktemp("patch_controlnet")
    unet = tiny_unet(anatomy_encoding="label_map", num_anatomy_classes=3)
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    PatchSlidingWindowPipeline(unet, scheduler).save_pretrained(folder / "patch")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index, region in enumerate(["Chest", "Abdomen"]):
        hu = torch.randn(PATCH_VOLUME, generator=generator).cumsum(0) * 60 - 300
        lesion = torch.zeros(PATCH_VOLUME)
        lesion[6:14, 4:10, 5:12] = 1
        anatomy = torch.randint(0, 4, PATCH_VOLUME, generator=generator).float()
        for name, volume in [("ct", hu), ("lesion", lesion), ("anatomy", anatomy)]:
            save_nifti(volume, folder / f"{name}{index}.nii.gz")
        rows.append({"image": f"ct{index}.nii.gz", "region": region, "mask": f"lesion{index}.nii.gz",
                     "anatomy": f"anatomy{index}.nii.gz"})  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(rows))
    return folder


def train_patch(base, output, *extra):
    """Run the script on the tiny patch pipeline with 8³ patches."""
    return train(base, output, "--learning_rate", 1e-3, *extra, model="patch", size=("--patch_size", 8))


def check_patch_pipeline(output, result):
    """The run saved one loadable patch pipeline whose ControlNet has learned and samples a multi-window volume."""
    assert result.stderr.count("Saved the ControlNet pipeline") == 1
    trained = load_file(output / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert trained["controlnet_mid_block.weight"].abs().sum() > 0  # the zero convolutions have learned
    assert trained["controlnet_cond_embedding.conv_out.weight"].abs().sum() > 0
    pipe = PatchSlidingWindowPipeline.from_pretrained(output / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.controlnet, PatchControlNet3DModel)
    assert pipe.controlnet.config.conditioning_channels == 1 and pipe.unet.config.anatomy_encoding == "label_map"
    condition_volume = torch.rand(16, 8, 16) * 2 - 1
    volume = pipe("Chest", volume_size=(16, 8, 16), controlnet_cond=condition_volume, window_size=8,
                  num_inference_steps=2, output_type="pt").volumes  # fmt: skip
    assert volume.shape == (1, 1, 16, 8, 16) and torch.isfinite(volume).all()
    return trained


def test_patch_controlnet_for_lesion_generation(patch_base, tmp_path):
    result = train_patch(patch_base, tmp_path / "lesion", "--condition", "lesion_mask", "--max_train_steps", 2)
    check_patch_pipeline(tmp_path / "lesion", result)


def test_patch_controlnet_for_super_resolution_validates_and_resumes_exactly(patch_base, tmp_path):
    common = ["--condition", "thick_slice", "--slice_factor", 3, "--checkpointing_steps", 1, "--seed", 1]
    validation = ["--validation_steps", 3, "--validation_inference_steps", 2]  # sampling leaves the weights alone
    result = train_patch(patch_base, tmp_path / "straight", *common, "--max_train_steps", 3, *validation)
    straight = check_patch_pipeline(tmp_path / "straight", result)
    folder = tmp_path / "straight" / "validation" / "step-3"
    assert {p.name for p in folder.iterdir()} == {"condition.nii.gz", "target.nii.gz", "sample.nii.gz"}
    assert nib.load(folder / "sample.nii.gz").shape == (8, 8, 8)
    # Two steps (one epoch of the two volumes), then one more from the checkpoint: the crops of epoch 1 are the same.
    train_patch(patch_base, tmp_path / "resumed", *common, "--max_train_steps", 2)
    train_patch(
        patch_base, tmp_path / "resumed", *common, "--max_train_steps", 3, "--resume_from_checkpoint", "latest"
    )
    resumed = load_file(tmp_path / "resumed" / "controlnet" / "diffusion_pytorch_model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-6, msg=key)


def test_patch_size_must_fit_the_unet(patch_base, tmp_path):
    spec = importlib.util.spec_from_file_location("train_controlnet", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--pretrained_model", str(patch_base / "patch"), "--train_data", str(patch_base / "manifest.json"),
            "--output_dir", str(tmp_path), "--condition", "thick_slice"]  # fmt: skip
    with pytest.raises(ValueError, match="must be multiples of 2"):
        script.make_task(script.parse_args([*argv, "--patch_size", "7"]))
    task = script.make_task(script.parse_args([*argv, "--patch_size", "8", "8", "4"]))
    assert task.patch_size == (8, 8, 4) and task.dataset.anatomy
    item = task.dataset[1]
    assert item["target"].shape == item["condition"].shape == (1, 8, 8, 4) and item["anatomy"].dtype == torch.long
    assert item["position"].shape == (3, 8, 8, 4) and item["class_labels"] == 2
    # The condition is the crop of the whole volume's thick slices (runs of 5 slices of the volume, not of the crop).
    whole = task.dataset.preprocessor(2)(str(patch_base / "ct1.nii.gz"))
    axes = item["position"][0, :, 0, 0], item["position"][1, 0, :, 0], item["position"][2, 0, 0, :]
    index = [((axis + 1) / 2 * (side - 1)).round().long() for axis, side in zip(axes, PATCH_VOLUME)]
    expected = thick_slice_condition(whole[None], 5)[0][:, index[0]][:, :, index[1]][:, :, :, index[2]]
    torch.testing.assert_close(item["condition"], expected)
    torch.testing.assert_close(item["target"], whole[:, index[0]][:, :, index[1]][:, :, :, index[2]])
