"""examples/train_patch_unet.py on CPU: tiny runs on real NIfTI files, exact resume, two processes, the pipeline."""

import json
import re
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import PatchSlidingWindowPipeline
from tests.conftest import CT_CHEST_CROP
from tests.examples.utils import EXAMPLES, run

SCRIPT = str(EXAMPLES / "train_patch_unet.py")
TINY = ["--patch_size", "8", "--block_out_channels", "8", "16", "--attention_levels", "0", "1"]
TINY += ["--attention_head_dim", "8", "--norm_num_groups", "4", "--num_position_frequencies", "2"]
TINY += ["--anatomy_encoding", "one_hot", "--num_anatomy_classes", "2", "--spacing", "4", "4", "4"]
TINY += ["--report_to", "none", "--seed", "3"]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Four CT volumes in HU with real affines: the LPS chest crop (5 mm slices) and a synthetic RAS head (3 mm), each
    once with a two-label anatomy file (body, bone) on its grid and once without."""
    folder = tmp_path_factory.mktemp("data")
    chest = nib.load(CT_CHEST_CROP)
    hu = chest.get_fdata().astype(np.float32)
    labels = ((hu > -500).astype(np.int16) + (hu > 200)).astype(np.int16)
    nib.save(nib.Nifti1Image(labels, chest.affine), str(folder / "chest_anatomy.nii.gz"))
    x, y, z = np.mgrid[:18, :20, :12]
    radius = ((x - 9) / 8) ** 2 + ((y - 10) / 9) ** 2 + ((z - 6) / 6) ** 2
    head = np.where(radius < 1, 40.0, -1000.0).astype(np.float32)
    head[(radius > 0.75) & (radius < 1)] = 800.0
    affine = np.array([[3.0, 0, 0, -27], [0, 3.0, 0, -30], [0, 0, 3.0, -18], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(head, affine), str(folder / "head.nii.gz"))
    head_labels = ((head > -500).astype(np.int16) + (head > 300)).astype(np.int16)
    nib.save(nib.Nifti1Image(head_labels, affine), str(folder / "head_anatomy.nii.gz"))
    rows = [
        {"image": str(CT_CHEST_CROP), "region": "Chest", "anatomy": "chest_anatomy.nii.gz"},
        {"image": "head.nii.gz", "region": "HaN", "anatomy": "head_anatomy.nii.gz"},
        {"image": str(CT_CHEST_CROP), "region": "Abdomen"},
        {"image": "head.nii.gz", "region": "0"},
    ]
    (folder / "manifest.json").write_text(json.dumps(rows))
    return folder / "manifest.json"


def train(manifest, output, *extra, launcher=(sys.executable,), env=None):
    return run(*launcher, SCRIPT, "--train_data", str(manifest), "--output_dir", str(output), *TINY, *extra, env=env)


def unet_weights(output):
    return load_file(output / "unet" / "diffusion_pytorch_model.safetensors")


def test_resumed_run_ends_with_the_same_weights_and_the_pipeline_generates(manifest, tmp_path):
    """4 steps (2 micro-steps each) in one run equal 2 steps + a resume to 4; the result loads and generates."""
    common = ["--checkpointing_steps", "2", "--gradient_accumulation_steps", "2", "--anatomy_dropout", "0.5"]
    straight = train(
        manifest, tmp_path / "straight", "--max_train_steps", "4", *common, "--checkpoints_total_limit", "1",
        "--validation_steps", "4", "--validation_inference_steps", "2", "--validation_volume_size", "16", "8", "8",
    )  # fmt: skip
    train(manifest, tmp_path / "resumed", "--max_train_steps", "2", *common)
    train(manifest, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    first, second = unet_weights(tmp_path / "straight"), unet_weights(tmp_path / "resumed")
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=1e-6, msg=key)
    loss = float(re.search(r"last loss (\S+)", straight.stderr).group(1))
    assert np.isfinite(loss) and loss > 0
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-4"]
    # Validation: one HU volume per region of the manifest, with the region's window and 4 mm voxels.
    validation = sorted(p.name for p in (tmp_path / "straight" / "validation" / "step-4").glob("*.nii.gz"))
    assert validation == ["Abdomen_2.nii.gz", "Chest_1.nii.gz", "HeadNeck_0.nii.gz"]
    chest = nib.load(tmp_path / "straight" / "validation" / "step-4" / "Chest_1.nii.gz")
    assert chest.shape == (8, 8, 16) and np.allclose(np.diag(chest.affine)[:3], 4.0)
    assert -1400 <= chest.get_fdata().min() and chest.get_fdata().max() <= 400

    pipe = PatchSlidingWindowPipeline.from_pretrained(tmp_path / "straight")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.beta_schedule == "squaredcos_cap_v2" and pipe.scheduler.config.thresholding
    assert pipe.unet.config.anatomy_encoding == "one_hot" and pipe.get_region("Thorax").class_id == 1
    assert pipe.config.window_size == 8  # the training patch is the default sampling window
    anatomy = torch.zeros((1, 1, 8, 16, 8), dtype=torch.long)
    anatomy[..., 2:6, 4:12, 2:6] = 1
    output = pipe("Chest", volume_size=(8, 16, 8), window_size=8, anatomy=anatomy, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="pt")  # fmt: skip
    assert output.volumes.shape == (1, 1, 8, 16, 8) and torch.isfinite(output.volumes).all()


def test_two_process_training_with_checkpoint_limit(manifest, tmp_path):
    output = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    result = train(manifest, output, *extra, launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert result.stderr.count("Saved the pipeline") == 1  # one training run over two ranks, not two runs
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (output / "checkpoint-3" / "random_states_1.pkl").is_file()  # both ranks saved their state
    assert (output / "model_index.json").is_file()
    assert np.isfinite(float(re.search(r"last loss (\S+)", result.stderr)[1]))


def test_the_region_window_is_the_training_intensity_scaling(manifest):
    """Training volumes are the region's HU window of the resampled RAS volume: what `pipe.hu_window` inverts."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        from train_patch_unet import RegionVolumes, load_regions
    finally:
        sys.path.remove(str(EXAMPLES))
    from meddiffusers.io.intensity import HUWindow
    from meddiffusers.training.data import VolumePreprocessor, read_manifest

    regions = load_regions(None)
    dataset = RegionVolumes(read_manifest(manifest, regions), regions, (4, 4, 4), num_anatomy_classes=2)
    chest, abdomen = dataset[0], dataset[2]
    hu = VolumePreprocessor("ct:-2000:2000", (4.0, 4.0, 4.0))(str(CT_CHEST_CROP))
    hu = HUWindow(-2000, 2000).inverse(hu)
    torch.testing.assert_close(chest["image"], HUWindow(-1400, 400)(hu), atol=1e-4, rtol=0)
    torch.testing.assert_close(abdomen["image"], HUWindow(-120, 240)(hu), atol=1e-4, rtol=0)
    assert chest["anatomy"].shape == chest["image"].shape and abdomen["anatomy"] is None
    assert dataset[0] is chest  # kept in memory
    assert chest["image"].shape == (1, 5, 73, 73)  # 4 x 5 mm slices and 128 x 2.28 mm rows at 4 mm
