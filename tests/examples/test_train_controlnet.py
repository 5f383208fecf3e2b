"""examples/train_controlnet.py on CPU: two processes, resume, and sampling with the trained ControlNet."""

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

from meddiffusers import MedDiffusionControlNetPipeline, save_nifti
from tests.pipelines.test_meddiffusion import build_pipeline

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_controlnet.py"
VOLUME = str(ROOT / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz")


def train(base, output, *extra, launcher=(sys.executable,), env=None):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    command = [
        *launcher,
        str(SCRIPT),
        "--pretrained_model",
        str(base / "pipe"),
        "--train_data",
        str(base / "manifest.json"),
        "--output_dir",
        str(output),
        "--volume_size",
        "32",
        "64",
        "64",
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
