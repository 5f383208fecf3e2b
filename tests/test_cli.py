"""The `meddiffusers` command line."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from meddiffusers.cli import main
from tests.conftest import FIXTURES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "mr_t1_itk_kmeanstest.nii.gz"
CKPT = FIXTURES / "patchvolume_8x_tiny" / "patchvolume_8x_tiny.ckpt"


def test_autoencode_writes_reconstruction_with_input_geometry(tmp_path, capsys):
    output, latent = tmp_path / "recon.nii.gz", tmp_path / "latent.nii.gz"
    args = ["autoencode", "--vqvae", str(CKPT), "--input", str(EXAMPLE), "--output", str(output)]
    assert main([*args, "--latent-output", str(latent)]) == 0
    source, recon = nib.load(EXAMPLE), nib.load(output)
    assert recon.shape == source.shape
    np.testing.assert_array_equal(recon.affine, source.affine)
    assert np.isfinite(recon.get_fdata()).all()
    assert nib.load(latent).shape == (16, 16, 8, 4)  # (x, y, z, channels) of the (4, 8, 16, 16) latent
    assert "mean |reconstruction - input|" in capsys.readouterr().out


def test_autoencode_with_saved_model_folder_and_ct_window(tmp_path):
    from meddiffusers import VQModel3D

    VQModel3D.from_single_file(CKPT).save_pretrained(tmp_path / "vqvae")
    output = tmp_path / "recon.nii.gz"
    args = ["autoencode", "--vqvae", str(tmp_path / "vqvae"), "--input", str(EXAMPLE), "--output", str(output)]
    assert main([*args, "--intensity", "ct-wide", "--tile"]) == 0
    recon = nib.load(output).get_fdata()
    assert recon.shape == nib.load(EXAMPLE).shape and np.isfinite(recon).all()


def test_errors_are_reported_without_traceback(tmp_path, capsys):
    args = ["autoencode", "--vqvae", str(CKPT), "--input", str(tmp_path / "absent.nii.gz"), "--output", "x.nii.gz"]
    assert main(args) == 2
    assert "NIfTI file not found" in capsys.readouterr().err
    args = ["autoencode", "--vqvae", str(CKPT), "--input", str(EXAMPLE), "--output", "x.nii.gz", "--intensity", "nope"]
    assert main(args) == 2


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "meddiffusers.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "autoencode" in result.stdout


def test_generate_writes_valid_nifti_from_a_saved_tiny_pipeline(tmp_path, capsys):
    from meddiffusers import MedDiffusionPipeline
    from tests.pipelines.test_meddiffusion import build_pipeline

    regions = [{"name": "MRBrainT1", "class_id": 3, "aliases": ["MRBrain"], "volume_size": [32, 64, 64]}]
    MedDiffusionPipeline(**build_pipeline().components, regions=regions).save_pretrained(tmp_path / "pipe")
    output = tmp_path / "brain.nii.gz"
    args = ["generate", "--model", str(tmp_path / "pipe"), "--region", "MRBrain", "--output", str(output)]
    assert main([*args, "--steps", "3", "--seed", "1", "--scheduler", "dpm++", "--num-volumes", "2"]) == 0
    images = [nib.load(tmp_path / f"brain_{index}.nii.gz") for index in range(2)]
    assert all(image.shape == (64, 64, 32) and np.isfinite(image.get_fdata()).all() for image in images)
    assert "generated 2 x MRBrainT1" in capsys.readouterr().out
    assert main([*args, "--region", "Liver"]) == 2
    assert "Unknown region 'Liver'" in capsys.readouterr().err
    assert main([*args, "--scheduler", "magic"]) == 2


def test_generate_defaults_to_the_bundled_demo_model(tmp_path, capsys):
    output = tmp_path / "demo_brain.nii.gz"
    assert main(["generate", "--region", "MRBrain", "--output", str(output), "--steps", "3", "--seed", "0"]) == 0
    image = nib.load(output)
    assert image.shape == (64, 64, 32) and np.isfinite(image.get_fdata()).all()
    assert image.header.get_zooms() == (4.0, 4.0, 6.0)
    assert "bundled demo model" in capsys.readouterr().out
