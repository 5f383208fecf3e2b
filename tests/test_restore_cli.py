"""`meddiffusers restore`: every task end to end on small real crops (tests/fixtures/restore, see make_fixtures.py)
with the bundled demo priors and few steps; the output's geometry, values against the library call or the ground
truth, and the one-line errors that leave no file behind."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meddiffusers import DiffPIRPipeline, MedDiffusionPipeline, PatchSlidingWindowPipeline
from meddiffusers.cli import main
from meddiffusers.demo import demo_model_path, patch_demo_model_path
from meddiffusers.io import load_nifti, save_nifti
from meddiffusers.operators import AveragePoolOperator, IdentityOperator, UndersampledMRI, cartesian_mask
from meddiffusers.pipelines.diffpir import IntensityMap
from meddiffusers.restore_cli import thin_slice_affine

FIXTURE = Path(__file__).parent / "fixtures" / "restore"
CT, LESION, MR = FIXTURE / "ct_chest_8mm.nii.gz", FIXTURE / "ct_chest_8mm_lesion.nii.gz", FIXTURE / "mr_t1_slab.nii.gz"
WINDOW = IntensityMap(-1400.0, 400.0)  # the patch demo's chest window


def restore(*args) -> int:
    return main(["restore", *map(str, args)])


def rmse(a: torch.Tensor, b: torch.Tensor, low=-1400.0, high=400.0) -> float:
    return float(((a.clamp(low, high) - b.clamp(low, high)) ** 2).mean().sqrt())


@pytest.fixture(scope="module")
def ct():
    return load_nifti(CT)


@pytest.fixture(scope="module")
def ct_diffpir():
    pipe = DiffPIRPipeline.from_pipe(PatchSlidingWindowPipeline.from_pretrained(patch_demo_model_path()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_denoise_is_the_documented_diffpir_call_in_hu_with_the_inputs_geometry(tmp_path, ct, ct_diffpir, capsys):
    noisy = ct.tensor + 60.0 * torch.randn(ct.tensor.shape, generator=torch.Generator().manual_seed(0))
    save_nifti(noisy, tmp_path / "noisy.nii.gz", affine=ct.affine, header=ct.header)
    output = tmp_path / "out" / "denoised.nii.gz"
    args = ["--task", "denoise", "--input", tmp_path / "noisy.nii.gz", "--noise-level", 60, "--output", output]
    assert restore(*args, "--steps", 5, "--seed", 3) == 0
    assert "bundled demo model" in capsys.readouterr().out
    written = nib.load(output)
    np.testing.assert_array_equal(written.affine, ct.affine)
    assert written.header.get_xyzt_units() == ct.header.get_xyzt_units() and written.shape == (16, 16, 16)
    # The recipe: sigma_n = 60 HU over the 1800 HU window, lambda 10, zeta 0.3, the region's window.
    expected = ct_diffpir(
        noisy, IdentityOperator(), noise_level=60 / 1800, lambda_=10.0, zeta=0.3, num_inference_steps=5,
        intensity_map=WINDOW, region="Chest", generator=torch.Generator().manual_seed(3), output_type="pt",
    ).volumes  # fmt: skip
    restored = load_nifti(output).tensor
    torch.testing.assert_close(restored, WINDOW.to_data(expected), atol=1e-3, rtol=0)
    assert restored.min() >= -1400 - 1e-3 and restored.max() <= 400 + 1e-3
    assert list(tmp_path.joinpath("out").iterdir()) == [output]  # no temporary file left


def test_zsr_output_is_on_the_thin_slice_grid_and_is_the_diffpir_call(tmp_path, ct, ct_diffpir):
    operator = AveragePoolOperator(4, axes=(0,))
    thick = operator(ct.tensor)
    thick_affine = ct.affine.copy()
    thick_affine[:3, 2] *= 4  # z spacing 32 mm, each thick voxel centred on its four thin ones
    thick_affine[:3, 3] += ct.affine[:3, 2] * 1.5
    save_nifti(thick, tmp_path / "thick.nii.gz", affine=thick_affine)
    output, baseline = tmp_path / "thin.nii.gz", tmp_path / "trilinear.nii.gz"
    args = ["--task", "zsr", "--factor", 4, "--input", tmp_path / "thick.nii.gz", "--output", output]
    assert restore(*args, "--baseline-output", baseline, "--steps", 5) == 0
    written = nib.load(output)
    assert written.shape == (16, 16, 16)
    np.testing.assert_allclose(written.affine, ct.affine, atol=1e-9)  # the thin grid the thick slices came from
    np.testing.assert_allclose(written.header.get_zooms(), (8.0, 8.0, 8.0))
    expected = ct_diffpir(
        thick, operator, noise_level=0.01, lambda_=7.0, zeta=0.3, num_inference_steps=5, intensity_map=WINDOW,
        region="Chest", generator=torch.Generator().manual_seed(0), output_type="pt",
    ).volumes  # fmt: skip
    torch.testing.assert_close(load_nifti(output).tensor, WINDOW.to_data(expected), atol=1e-3, rtol=0)
    trilinear = F.interpolate(thick, size=(16, 16, 16), mode="trilinear", align_corners=False)
    torch.testing.assert_close(load_nifti(baseline).tensor, trilinear, atol=1e-3, rtol=0)


def test_thin_slice_affine_splits_each_voxel_along_the_chosen_file_axes():
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [3.0, 0.0, 0.0, -5.0], [0.0, 0.0, 6.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    fine = thin_slice_affine(affine, {0: 3, 2: 2})
    # Fine voxel i along x has its centre at coarse coordinate (i + 0.5) / 3 - 0.5.
    for i, k in [(0, 0), (2, 1), (4, 3)]:
        coarse = np.array([(i + 0.5) / 3 - 0.5, 7.0, (k + 0.5) / 2 - 0.5, 1.0])
        np.testing.assert_allclose(fine @ np.array([i, 7.0, k, 1.0]), affine @ coarse)
    np.testing.assert_allclose(np.linalg.norm(fine[:3, :3], axis=0), [1.0, 2.0, 3.0])


def test_zsr_along_x_refines_only_x(tmp_path, ct):
    thick = AveragePoolOperator(2, axes=(1,))(ct.tensor)  # tensor H = file x
    save_nifti(thick, tmp_path / "thick_x.nii.gz", affine=ct.affine)
    output = tmp_path / "fine_x.nii.gz"
    assert restore("--task", "zsr", "--factor", 2, "--axes", "x", "--input", tmp_path / "thick_x.nii.gz",
                   "--output", output, "--steps", 2) == 0  # fmt: skip
    written = nib.load(output)
    assert written.shape == (16, 16, 16)
    np.testing.assert_allclose(written.affine, thin_slice_affine(ct.affine, {0: 2}))
    np.testing.assert_allclose(written.header.get_zooms(), (4.0, 8.0, 8.0))


def test_sparse_view_ct_beats_filtered_back_projection(tmp_path, ct):
    output, fbp = tmp_path / "sparse.nii.gz", tmp_path / "fbp.nii.gz"
    args = ["--model", patch_demo_model_path(), "--task", "sparse-ct", "--views", 24, "--input", CT]
    assert restore(*args, "--output", output, "--baseline-output", fbp, "--steps", 10) == 0
    truth = ct.tensor
    restored, baseline = load_nifti(output).tensor, load_nifti(fbp).tensor
    np.testing.assert_array_equal(nib.load(output).affine, ct.affine)
    # Measured: 120 HU RMSE against 174 HU for the FBP of the 24-view sinogram (in the prior's window).
    assert rmse(restored, truth) < 0.8 * rmse(baseline, truth)


def test_mri_with_the_latent_prior_is_the_diffpir_call_and_the_baseline_is_zero_filled(tmp_path):
    source = load_nifti(MR)
    output, zero_filled = tmp_path / "mri.nii.gz", tmp_path / "zero_filled.nii.gz"
    args = ["--model", "meddiffusion-demo", "--region", "MRBrain", "--task", "mri", "--acceleration", 4]
    assert restore(*args, "--input", MR, "--output", output, "--baseline-output", zero_filled, "--steps", 3) == 0
    np.testing.assert_array_equal(nib.load(output).affine, source.affine)
    low, high = np.percentile(source.tensor.double().numpy(), [0.5, 99.5])
    intensity_map = IntensityMap(float(low), float(high))
    operator = UndersampledMRI(cartesian_mask(32, 4, center_fraction=0.08, seed=0))
    kspace = operator(source.tensor)
    pipe = DiffPIRPipeline.from_pipe(MedDiffusionPipeline.from_pretrained(demo_model_path()))
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        kspace, operator, noise_level=0.01, lambda_=7.0, zeta=0.3, num_inference_steps=3, intensity_map=intensity_map,
        region="MRBrainT1", generator=torch.Generator().manual_seed(0), output_type="pt",
    ).volumes  # fmt: skip
    torch.testing.assert_close(load_nifti(output).tensor, intensity_map.to_data(expected), atol=2e-3, rtol=0)
    torch.testing.assert_close(load_nifti(zero_filled).tensor, operator.zero_filled(kspace).real, atol=1e-3, rtol=0)


def test_repaint_inpaints_the_lesion_and_keeps_every_other_voxel(tmp_path, ct):
    # 15 slices: not a multiple of the prior's side, so the volume is padded for the prior and cropped back.
    image, lesion = ct.tensor[:, :, 1:], load_nifti(LESION).tensor[:, :, 1:]
    affine = ct.affine.copy()
    affine[:3, 3] += ct.affine[:3, 2]
    save_nifti(image, tmp_path / "ct.nii.gz", affine=affine)
    save_nifti(lesion, tmp_path / "lesion.nii.gz", affine=affine)
    output = tmp_path / "inpainted.nii.gz"
    args = ["--task", "inpaint", "--input", tmp_path / "ct.nii.gz", "--mask", tmp_path / "lesion.nii.gz"]
    assert restore(*args, "--output", output, "--steps", 10, "--jump-length", 3, "--jump-n-sample", 2) == 0
    written = nib.load(output)
    np.testing.assert_array_equal(written.affine, affine)
    restored, inside = load_nifti(output).tensor, lesion.bool()
    assert restored.shape == image.shape
    torch.testing.assert_close(restored[~inside], image[~inside], atol=0, rtol=0)
    # The 45 voxels under the mask are the prior's, in the chest window (the input's there are not kept).
    assert restored[inside].min() >= -1400 - 1e-3 and restored[inside].max() <= 400 + 1e-3
    assert (restored[inside] - image[inside]).abs().mean() > 50


def test_diffpir_inpainting_keeps_the_known_voxels(tmp_path, ct):
    output = tmp_path / "inpainted.nii.gz"
    args = ["--task", "inpaint", "--method", "diffpir", "--input", CT, "--mask", LESION, "--output", output]
    assert restore(*args, "--steps", 4) == 0
    restored, inside = load_nifti(output).tensor, load_nifti(LESION).tensor.bool()
    torch.testing.assert_close(restored[~inside], ct.tensor[~inside], atol=0, rtol=0)
    assert (restored[inside] - ct.tensor[inside]).abs().max() > 10


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch, capsys):
    import meddiffusers.io

    def failing_save(volume, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(meddiffusers.io, "save_nifti", failing_save)
    output = tmp_path / "out.nii.gz"
    assert restore("--task", "sparse-ct", "--input", CT, "--output", output, "--steps", 2) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def anatomy_model(tmp_path_factory):
    """A saved patch pipeline whose (random-weight) U-Net is conditioned on one-hot anatomy, on the demo's grid."""
    from diffusers import DDPMScheduler

    from meddiffusers import PatchUNet3DModel

    torch.manual_seed(0)
    unet = PatchUNet3DModel(
        block_out_channels=(8, 16), attention_levels=(False, False), mid_block_attention=False, norm_num_groups=4,
        num_position_frequencies=1, anatomy_encoding="one_hot", num_anatomy_classes=3, num_class_embeds=1,
    )  # fmt: skip
    regions = [{"name": "Chest", "class_id": 0, "spacing": [8.0, 8.0, 8.0], "intensity_window": [-1400.0, 400.0]}]
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=True)
    path = tmp_path_factory.mktemp("anatomy_model")
    PatchSlidingWindowPipeline(unet, scheduler, regions=regions, window_size=8).save_pretrained(path)
    return path


def test_anatomy_reaches_the_prior_and_all_background_is_the_same_as_none(tmp_path, ct, anatomy_model):
    lesion = load_nifti(LESION).tensor
    save_nifti(1 + lesion, tmp_path / "organs.nii.gz", affine=ct.affine)  # 1 lung, 2 lesion
    save_nifti(0 * lesion, tmp_path / "background.nii.gz", affine=ct.affine)
    outputs = {}
    for name in ("organs", "background", None):
        outputs[name] = tmp_path / f"restored_{name}.nii.gz"
        anatomy = ["--anatomy", tmp_path / f"{name}.nii.gz"] if name else []
        args = ["--model", anatomy_model, "--task", "sparse-ct", "--input", CT, "--output", outputs[name]]
        assert restore(*args, *anatomy, "--steps", 3, "--window-batch-size", 8) == 0
    volumes = {name: load_nifti(path).tensor for name, path in outputs.items()}
    torch.testing.assert_close(volumes["background"], volumes[None], atol=0, rtol=0)
    assert (volumes["organs"] - volumes[None]).abs().max() > 1.0  # HU


def test_anatomy_is_checked_against_the_grid_and_the_prior(tmp_path, ct, anatomy_model, capsys):
    output = tmp_path / "out.nii.gz"
    save_nifti(torch.zeros(1, 1, 8, 16, 16), tmp_path / "small.nii.gz", affine=ct.affine)
    save_nifti(torch.full_like(ct.tensor, 0.5), tmp_path / "fractional.nii.gz", affine=ct.affine)
    save_nifti(torch.zeros_like(ct.tensor), tmp_path / "labels.nii.gz", affine=ct.affine)
    for model, anatomy, message in [
        (anatomy_model, "small.nii.gz", "has shape"),
        (anatomy_model, "fractional.nii.gz", "integer labels"),
        ("meddiffusion-demo", "labels.nii.gz", "PatchSlidingWindowPipeline"),
        ("meddiff-fm-demo", "labels.nii.gz", "takes none"),  # the demo prior has no anatomy channels
    ]:
        args = ["--model", model, "--region", 0, "--task", "sparse-ct", "--input", CT, "--output", output]
        assert restore(*args, "--anatomy", tmp_path / anatomy) == 2
        assert message in capsys.readouterr().err
        assert not output.exists()


# ------------------------------------------------------------------------------------------------ bad input


def write(tmp_path, name, array, affine=None):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4) if affine is None else affine), path)
    return path


@pytest.fixture
def bad_inputs(tmp_path, ct):
    """name -> (arguments, expected message) for every input the command refuses."""
    volume = nib.load(CT).get_fdata()
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    labels = nib.load(LESION).get_fdata() * 2
    index = tmp_path / "other_pipeline"
    index.mkdir()
    (index / "model_index.json").write_text(json.dumps({"_class_name": "VQModel3D"}))
    base = ["--input", CT, "--output", tmp_path / "out.nii.gz"]
    inpaint = ["--task", "inpaint", "--input", CT, "--output", tmp_path / "out.nii.gz"]
    return {
        "missing input": (
            ["--task", "sparse-ct", "--input", tmp_path / "absent.nii.gz", "--output", tmp_path / "out.nii.gz"],
            "no such file",
        ),  # fmt: skip
        "2D input": (
            [
                "--task",
                "sparse-ct",
                "--input",
                write(tmp_path, "flat.nii.gz", volume[..., :1]),
                "--output",
                tmp_path / "out.nii.gz",
            ],
            "not a 3D volume",
        ),  # fmt: skip
        "4D input": (
            [
                "--task",
                "sparse-ct",
                "--input",
                write(tmp_path, "series.nii.gz", np.stack([volume] * 2, -1)),
                "--output",
                tmp_path / "out.nii.gz",
            ],
            "2 channels",
        ),  # fmt: skip
        "NaN": (
            [
                "--task",
                "sparse-ct",
                "--input",
                write(tmp_path, "nan.nii.gz", nan, ct.affine),
                "--output",
                tmp_path / "out.nii.gz",
            ],
            "NaN",
        ),  # fmt: skip
        "mask shape": (
            [*inpaint, "--mask", write(tmp_path, "m.nii.gz", np.zeros((16, 16, 8)), ct.affine)],
            "has shape",
        ),  # fmt: skip
        "mask values": ([*inpaint, "--mask", write(tmp_path, "m2.nii.gz", labels, ct.affine)], "only 0"),
        "empty mask": ([*inpaint, "--mask", write(tmp_path, "m3.nii.gz", 0 * labels, ct.affine)], "no voxel"),
        "mask grid": ([*inpaint, "--mask", write(tmp_path, "m4.nii.gz", labels / 2)], "another grid"),
        "no mask": (inpaint, "needs --mask"),
        "mask elsewhere": (["--task", "zsr", *base, "--mask", LESION], "inpaint only"),
        "unknown task": (["--task", "deblur", *base], "Unknown --task 'deblur'"),
        "unknown method": (["--task", "inpaint", "--mask", LESION, "--method", "ddrm", *base], "Unknown --method"),
        "repaint elsewhere": (["--task", "zsr", "--method", "repaint", *base], "inpaints only"),
        "unknown region": (["--task", "sparse-ct", "--region", "Knee", *base], "Knee"),
        "two regions": (["--task", "mri", "--model", "meddiffusion-demo", *base], "pass --region"),
        "no noise level": (["--task", "denoise", *base], "needs --noise-level"),
        "bad output name": (["--task", "sparse-ct", "--input", CT, "--output", tmp_path / "out.nrrd"], ".nii"),
        "overwrite input": (["--task", "sparse-ct", "--input", CT, "--output", CT], "overwrite"),
        "bad axes": (["--task", "zsr", "--axes", "t", *base], "--axes"),
        "bad model": (["--task", "sparse-ct", "--model", index, *base], "VQModel3D"),
        "missing model": (["--task", "sparse-ct", "--model", tmp_path / "nowhere" / "model.ckpt", *base], "no such"),
        "bad device": (["--task", "sparse-ct", "--device", "tpu", *base], "--device"),
    }


BAD = [
    "missing input", "2D input", "4D input", "NaN", "mask shape", "mask values", "empty mask", "mask grid",
    "no mask", "mask elsewhere", "unknown task", "unknown method", "repaint elsewhere", "unknown region",
    "two regions", "no noise level", "bad output name", "overwrite input", "bad axes", "bad model", "missing model",
    "bad device",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_exit_code_2_one_line_and_no_output(case, bad_inputs, tmp_path, capsys):
    args, message = bad_inputs[case]
    before = set(tmp_path.rglob("*"))
    assert restore(*args) == 2
    captured = capsys.readouterr()
    error = captured.err.strip()
    assert error.startswith("meddiffusers restore: error: ") and "\n" not in error
    assert message in error
    assert set(tmp_path.rglob("*")) == before  # nothing written
    assert "%|" not in captured.err  # failed before any model ran
