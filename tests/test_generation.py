"""Generating a set of volumes on one process and split between two `accelerate launch` processes."""

import sys

import nibabel as nib
import numpy as np
import pytest

from meddiffusers.generation import indices_of_this_process, volume_seeds
from tests.examples.utils import run


def test_each_volume_has_the_seed_of_its_index():
    assert volume_seeds(7, 3) == [7, 8, 9]
    drawn = volume_seeds(None, 4)
    assert len(set(drawn)) == 4 and all(0 <= seed < 2**62 for seed in drawn)
    assert indices_of_this_process(3) == [0, 1, 2]  # one process generates every volume


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from meddiffusers import MedDiffusionPipeline
    from tests.pipelines.test_meddiffusion import build_pipeline

    folder = tmp_path_factory.mktemp("pipe")
    regions = [{"name": "MRBrainT1", "class_id": 3, "aliases": ["MRBrain"], "volume_size": [32, 64, 64]}]
    MedDiffusionPipeline(**build_pipeline().components, regions=regions).save_pretrained(folder)
    return folder


def generate(launcher, pipeline, output, *extra):
    command = ["-m", "meddiffusers", "generate", "--model", str(pipeline), "--region", "MRBrain", "--steps", "3"]
    return run(*launcher, *command, "--eta", "1", "--output", str(output), *extra, env={"ACCELERATE_USE_CPU": "1"})


def test_two_processes_write_the_volumes_of_one_process(tiny_pipeline, tmp_path):
    """3 volumes with seed 5 split 2 + 1 between ranks: the same files, bit for bit, as one process writes."""
    alone = tmp_path / "alone" / "brain.nii.gz"
    alone.parent.mkdir()
    generate((sys.executable,), tiny_pipeline, alone, "--num-volumes", "3", "--seed", "5")
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
    shared = tmp_path / "shared" / "brain.nii.gz"
    shared.parent.mkdir()
    result = generate(launcher, tiny_pipeline, shared, "--num-volumes", "3", "--seed", "5")
    assert "process 0 of 2: generated 2 x MRBrainT1" in result.stdout
    assert "process 1 of 2: generated 1 x MRBrainT1" in result.stdout
    names = sorted(path.name for path in shared.parent.iterdir())
    assert names == sorted(path.name for path in alone.parent.iterdir()) == [f"brain_{i}.nii.gz" for i in range(3)]
    volumes = []
    for name in names:
        ours, reference = nib.load(shared.parent / name), nib.load(alone.parent / name)
        np.testing.assert_array_equal(ours.get_fdata(), reference.get_fdata())
        np.testing.assert_array_equal(ours.affine, reference.affine)
        volumes.append(ours.get_fdata())
    assert not np.allclose(volumes[0], volumes[1])  # distinct seeds, distinct volumes


def test_one_volume_of_a_set_can_be_regenerated_from_its_seed(tiny_pipeline, tmp_path):
    """Volume 2 of a seed-5 set is the single volume of a seed-7 run: a user can redo one file of a set."""
    generate((sys.executable,), tiny_pipeline, tmp_path / "set.nii.gz", "--num-volumes", "3", "--seed", "5")
    generate((sys.executable,), tiny_pipeline, tmp_path / "single.nii.gz", "--seed", "7")
    np.testing.assert_array_equal(
        nib.load(tmp_path / "set_2.nii.gz").get_fdata(), nib.load(tmp_path / "single.nii.gz").get_fdata()
    )
