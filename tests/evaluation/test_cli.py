"""`meddiffusers evaluate` end to end on small crops of real volumes, with the random extractor."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiffusers.cli import main
from meddiffusers.evaluation import (
    IntensityConvention,
    RandomFeatureExtractor,
    frechet_distance,
    kernel_inception_distance,
    maximum_mean_discrepancy,
    psnr,
    ssim_3d,
)
from meddiffusers.io import load_nifti
from tests.conftest import FIXTURES

REAL = FIXTURES / "evaluation" / "real"
FAKE = FIXTURES / "evaluation" / "fake"


def features_of(folder, convention):
    extractor = RandomFeatureExtractor(0)
    rows = []
    for path in sorted(folder.glob("*.nii.gz")):
        rows.append(extractor(convention.to_model_space(load_nifti(path, canonical=True).tensor)))
    return torch.cat(rows)


def test_generation_metrics_end_to_end_match_the_library_functions(tmp_path, capsys):
    output = tmp_path / "results" / "scores.json"
    code = main(
        [
            "evaluate",
            "--real", str(REAL),
            "--fake", str(FAKE),
            "--features", "random",
            "--metrics", "fid,kid,mmd,msssim",
            "--intensity", "percentile",
            "--msssim-scales", "2",
            "--ssim-kernel", "7",
            "--output", str(output),
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads(output.read_text())
    assert result["counts"] == {"real": 3, "fake": 3}
    assert result["extractor"]["name"] == "random-seed0" and result["extractor"]["comparable"] is False
    assert result["intensity"]["kind"] == "percentile"
    convention = IntensityConvention.parse("percentile")
    real, fake = features_of(REAL, convention), features_of(FAKE, convention)
    metrics = result["metrics"]
    assert metrics["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    kid, kid_std = kernel_inception_distance(real, fake)
    assert (metrics["kid"], metrics["kid_std"]) == pytest.approx((kid, kid_std), rel=1e-6, abs=1e-9)
    assert metrics["mmd"] == pytest.approx(maximum_mean_discrepancy(real, fake), rel=1e-6)
    assert 0 < metrics["msssim_fake"] < 1 and 0 < metrics["msssim_real"] < 1
    assert result["settings"]["msssim"]["pairs_fake"] == 3
    table = (tmp_path / "results" / "scores.md").read_text()
    assert "random-seed0 (not comparable)" in table and "| 3 | 3 |" in table
    assert f"{metrics['fid']:.6g}" in table
    assert "wrote" in capsys.readouterr().out


def noisy_copies(folder, target, sigma, seed=0):
    target.mkdir()
    rng = np.random.default_rng(seed)
    for path in sorted(folder.glob("*.nii.gz")):
        image = nib.load(path)
        data = image.get_fdata() + rng.normal(0, sigma, image.shape)
        nib.save(nib.Nifti1Image(data.astype(np.float32), image.affine), target / path.name)
    return target


def test_restoration_mode_pairs_by_name_and_scores_psnr_and_ssim(tmp_path):
    restored = noisy_copies(REAL, tmp_path / "restored", sigma=10.0)
    output = tmp_path / "restoration.json"
    args = ["evaluate", "--restoration", "--real", str(REAL), "--fake", str(restored), "--output", str(output)]
    assert main([*args, "--intensity", "hu:0:255", "--ssim-kernel", "7"]) == 0
    result = json.loads(output.read_text())
    assert result["mode"] == "restoration" and result["counts"] == {"pairs": 3}
    convention = IntensityConvention("hu", 0.0, 255.0)
    expected_psnr, expected_ssim = [], []
    for row, path in zip(result["pairs"], sorted(REAL.glob("*.nii.gz"))):
        assert row["name"] == path.name
        reference = convention.to_model_space(load_nifti(path, canonical=True).tensor)
        noisy = convention.to_model_space(load_nifti(restored / path.name, canonical=True).tensor)
        expected_psnr.append(float(psnr(noisy, reference, data_range=2.0)))
        expected_ssim.append(float(ssim_3d(noisy, reference, data_range=2.0, kernel_size=7)))
        assert row["psnr"] == pytest.approx(expected_psnr[-1]) and row["ssim"] == pytest.approx(expected_ssim[-1])
    assert result["metrics"]["psnr"] == pytest.approx(np.mean(expected_psnr))
    assert 20 < result["metrics"]["psnr"] < 40  # noise of 10 in a 255 window: about 28 dB
    assert "| mni152_crop0.nii.gz |" in output.with_suffix(".md").read_text()


def run_failing(args, capsys):
    code = main(["evaluate", *args])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bar
    assert code == 2
    assert err.startswith("meddiffusers evaluate: error:")
    return err


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    output = tmp_path / "out" / "r.json"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(FAKE, broken)
    (broken / "truncated.nii.gz").write_bytes((FAKE / "itk_kmeans_crop0.nii.gz").read_bytes()[:200])
    (broken / "notes.nii").write_text("not a volume")
    base = ["--real", str(REAL), "--output", str(output)]

    assert "holds no .nii/.nii.gz volumes: the set is empty" in run_failing([*base, "--fake", str(empty)], capsys)
    err = run_failing([*base, "--fake", str(broken)], capsys)
    assert "2 unreadable volume(s), nothing was written" in err
    assert "truncated.nii.gz" in err and "notes.nii" in err
    single = tmp_path / "one.txt"
    single.write_text(f"{FAKE / 'itk_kmeans_crop0.nii.gz'}\n")
    assert "need at least 2 per set" in run_failing([*base, "--fake", str(single)], capsys)
    assert "unknown ['lpips']" in run_failing([*base, "--fake", str(FAKE), "--metrics", "fid,lpips"], capsys)
    assert "must be a .json file" in run_failing(
        ["--real", str(REAL), "--fake", str(FAKE), "--output", str(tmp_path / "r.csv")], capsys
    )
    assert "smaller than the 176 voxels" in run_failing([*base, "--fake", str(FAKE), "--metrics", "msssim"], capsys)
    # restoration: names without a pair are listed
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(REAL / "mni152_crop0.nii.gz", partial / "mni152_crop0.nii.gz")
    shutil.copy(FAKE / "itk_kmeans_crop1.nii.gz", partial / "other.nii.gz")
    err = run_failing([*base, "--fake", str(partial), "--restoration"], capsys)
    assert "only in --real: mni152_crop1.nii.gz, mni152_crop2.nii.gz; only in --fake: other.nii.gz" in err
    # restoration: pairs whose shapes differ are listed
    shaped = tmp_path / "shaped"
    shaped.mkdir()
    for path in REAL.glob("*.nii.gz"):
        shutil.copy(path, shaped / path.name)
    image = nib.load(REAL / "mni152_crop2.nii.gz")
    nib.save(image.slicer[:20], shaped / "mni152_crop2.nii.gz")
    err = run_failing([*base, "--fake", str(shaped), "--restoration"], capsys)
    assert "mismatched shapes: mni152_crop2.nii.gz ((24, 24, 24) vs (24, 20, 24))" in err
    assert not output.exists() and not output.parent.exists()


def test_real_and_fake_sets_can_have_their_own_intensity_conventions(tmp_path):
    output = tmp_path / "mixed.json"
    args = ["evaluate", "--real", str(REAL), "--fake", str(FAKE), "--metrics", "fid", "--output", str(output)]
    assert main([*args, "--real-intensity", "hu:0:255", "--intensity", "percentile:1:99"]) == 0
    result = json.loads(output.read_text())
    assert (result["real_intensity"]["kind"], result["intensity"]["kind"]) == ("hu", "percentile")
    real = features_of(REAL, IntensityConvention("hu", 0.0, 255.0))
    fake = features_of(FAKE, IntensityConvention("percentile", 1.0, 99.0))
    assert result["metrics"]["fid"] == pytest.approx(frechet_distance(real, fake), rel=1e-6)
    assert "real: HU window [0, 255]" in output.with_suffix(".md").read_text()


def test_a_medicalnet_file_is_hashed_and_its_sha256_recorded(tmp_path, capsys):
    import hashlib

    from tests.evaluation.test_medicalnet import original_checkpoint

    weights = tmp_path / "resnet_10.pth"
    torch.save(original_checkpoint(10), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    output = tmp_path / "medicalnet.json"
    args = ["evaluate", "--real", str(REAL), "--fake", str(FAKE), "--intensity", "percentile", "--metrics", "fid,mmd"]
    assert main([*args, "--features", f"medicalnet10:{weights}", "--output", str(output)]) == 0
    assert f"sha256 {digest}" in capsys.readouterr().out
    extractor = json.loads(output.read_text())["extractor"]
    assert (extractor["name"], extractor["weights_sha256"], extractor["comparable"]) == (
        "medicalnet-resnet10",
        digest,
        True,
    )
    assert f"| medicalnet-resnet10 | {digest} |" in output.with_suffix(".md").read_text()
