"""examples/cache_latents.py and examples/train_biflownet.py on CPU: tiny runs, resume, two processes, the pipeline."""

import json
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import MedDiffusionPipeline, VQModel3D
from tests.conftest import FIXTURES
from tests.examples.utils import EXAMPLES, run

VOLUME = str(EXAMPLES / "data" / "mr_t1_itk_kmeanstest.nii.gz")
TINY = ["--base_channels", "6", "--channel_mults", "1", "1", "2", "4", "--attention_levels", "0", "0", "1", "1"]
TINY += ["--attention_heads", "2", "--norm_num_groups", "2", "--dit_num_heads", "2", "--report_to", "none"]


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A 4x tiny autoencoder folder and four cached latents of a real MRI volume (two regions)."""
    folder = tmp_path_factory.mktemp("data")
    VQModel3D.from_single_file(FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt").save_pretrained(
        folder / "vqvae"
    )
    rows = [{"image": VOLUME, "region": region} for region in ("MRBrain", "CTLegs", "MRBrain", "CTLegs")]
    (folder / "manifest.json").write_text(json.dumps(rows))
    run(
        sys.executable,
        str(EXAMPLES / "cache_latents.py"),
        "--pretrained_vqvae",
        str(folder / "vqvae"),
        "--train_data",
        str(folder / "manifest.json"),
        "--output_dir",
        str(folder / "latents"),
        "--volume_size",
        "32",
        "64",
        "64",
    )
    return folder


def train(latents, output, *extra, launcher=(sys.executable,), env=None):
    return run(
        *launcher,
        str(EXAMPLES / "train_biflownet.py"),
        "--train_latents",
        str(latents / "latents"),
        "--pretrained_vqvae",
        str(latents / "vqvae"),
        "--output_dir",
        str(output),
        *TINY,
        *extra,
        env=env,
    )


def final_weights(output):
    return load_file(output / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_cached_latents_are_normalised_encodings(latents):
    import datasets

    data = datasets.load_from_disk(str(latents / "latents"))
    assert len(data) == 4 and data[0]["shape"] == [4, 8, 16, 16]
    assert data["class_id"] == [3, 2, 3, 2]
    regions = json.loads((latents / "latents" / "regions.json").read_text())
    assert [r["name"] for r in regions][3] == "MRBrainT1"


def test_resumed_run_ends_with_the_same_weights(latents, tmp_path):
    common = ["--checkpointing_steps", "2", "--use_ema", "--seed", "3"]
    train(latents, tmp_path / "straight", "--max_train_steps", "4", *common)
    train(latents, tmp_path / "resumed", "--max_train_steps", "2", *common)
    train(latents, tmp_path / "resumed", "--max_train_steps", "4", "--resume_from_checkpoint", "latest", *common)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-6, msg=key)
    assert sorted(p.name for p in (tmp_path / "straight").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_two_process_training_checkpoint_limit_validation_and_generation(latents, tmp_path):
    output = tmp_path / "ddp"
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    extra += ["--validation_steps", "3", "--validation_inference_steps", "2", "--gradient_accumulation_steps", "1"]
    result = train(latents, output, *extra, launcher=launcher, env={"ACCELERATE_USE_CPU": "1"})
    assert result.stderr.count("Saved the pipeline") == 1  # one training run over two ranks, not two runs
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert (output / "checkpoint-3" / "random_states_1.pkl").is_file()  # both ranks saved their state
    validation = list((output / "validation" / "step-3").glob("*.nii.gz"))
    assert len(validation) == 1 and np.isfinite(nib.load(validation[0]).get_fdata()).all()

    pipe = MedDiffusionPipeline.from_pretrained(output / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.get_region("CTLegs").class_id == 2
    saved = pipe("MRBrain", volume_size=(32, 64, 64), num_inference_steps=2).save(tmp_path / "brain.nii.gz")
    image = nib.load(saved[0])
    assert image.shape == (64, 64, 32) and np.isfinite(image.get_fdata()).all()
    shutil.rmtree(output)


def test_mismatched_latent_shapes_in_a_batch_get_a_clear_error():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from train_biflownet import collate
    finally:
        sys.path.remove(str(EXAMPLES))
    items = [
        {"latents": torch.zeros(4, 8, 8, 8), "class_labels": 0},
        {"latents": torch.zeros(4, 8, 8, 16), "class_labels": 1},
    ]
    with pytest.raises(ValueError, match="share a shape"):
        collate(items)
