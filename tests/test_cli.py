"""The `meddiffusers` command line."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from meddiffusers.cli import main
from meddiffusers.demo import demo_model_path
from tests.conftest import EXAMPLE_VOLUME as EXAMPLE
from tests.conftest import FIXTURES

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


def test_autoencode_memory_budget_decodes_in_slabs_equal_to_the_full_decode(tmp_path, capsys, monkeypatch):
    from meddiffusers import VQModel3D

    full, slabs = tmp_path / "full.nii.gz", tmp_path / "slabs.nii.gz"
    args = ["autoencode", "--vqvae", str(CKPT), "--input", str(EXAMPLE)]
    assert main([*args, "--output", str(full)]) == 0
    assert "full decode" in capsys.readouterr().out
    calls = []
    slab_decode = VQModel3D.slab_decode
    monkeypatch.setattr(VQModel3D, "slab_decode", lambda self, *a, **k: calls.append(1) or slab_decode(self, *a, **k))
    assert main([*args, "--output", str(slabs), "--memory-budget", "0.001"]) == 0
    assert calls == [1] and "exact slabs decode" in capsys.readouterr().out
    full, slabs = nib.load(full).get_fdata(), nib.load(slabs).get_fdata()
    np.testing.assert_allclose(slabs, full, atol=1e-4 * np.abs(full).max())
    bad = ["--output", str(tmp_path / "x.nii.gz"), "--memory-budget", "0"]
    assert main([*args, *bad]) == 2 and "--memory-budget must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


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
    assert image.header.get_zooms() == (4.0, 4.0, 8.0)
    assert "bundled demo model" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- bad input: exit code 2


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a command loads a model: bad input must be reported before that."""
    from meddiffusers.models.autoencoders import loading
    from meddiffusers.pipelines import MedDiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input was bad")

    monkeypatch.setattr(loading, "load_vq_model", refuse)
    monkeypatch.setattr(MedDiffusionPipeline, "from_pretrained", refuse)


def one_line_error(capsys, command: str) -> str:
    """The single stderr line a failed command printed (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"meddiffusers {command}: error: ")
    return err


def cpu_only_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("cuda", "'cuda': CUDA is not available (this PyTorch build is CPU-only"),
        ("cuda:0", "'cuda:0': CUDA is not available"),
        ("tpu", "'tpu' is not a device name"),
        ("cuda:x", "'cuda:x' is not a device name"),
        ("mps", "'mps': Apple MPS is not available"),
        ("meta", "'meta' is not supported (use cpu, cuda[:N] or mps)"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "autoencode"])
def test_unavailable_or_invalid_devices_fail_before_loading(
    command, device, message, tmp_path, capsys, monkeypatch, no_model_loading
):
    cpu_only_torch(monkeypatch)
    output = str(tmp_path / "out.nii.gz")
    if command == "generate":
        args = ["generate", "--region", "MRBrain", "--output", output]
    else:
        args = ["autoencode", "--vqvae", str(CKPT), "--input", str(EXAMPLE), "--output", output]
    assert main([*args, "--device", device]) == 2
    err = one_line_error(capsys, command)
    assert f"--device {message}" in err and err.endswith("available here: cpu.")
    assert list(tmp_path.iterdir()) == []


def test_cuda_device_index_is_checked_against_the_device_count(monkeypatch):
    from meddiffusers.cli import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert [check_device(name) for name in ("cpu", "cuda", "cuda:1")] == ["cpu", "cuda", "cuda:1"]
    with pytest.raises(ValueError, match=r"has 2 CUDA device\(s\); available here: cpu, cuda, cuda:0, cuda:1\."):
        check_device("cuda:2")


@pytest.mark.parametrize("name", ["half.nii.gz", "header_only.nii.gz"])
def test_autoencode_of_a_truncated_file_names_it(name, tmp_path, capsys, no_model_loading):
    data = EXAMPLE.read_bytes()
    damaged = tmp_path / name
    damaged.write_bytes(data[: len(data) // 2] if name.startswith("half") else data[:200])
    output = tmp_path / "recon.nii.gz"
    assert main(["autoencode", "--vqvae", str(CKPT), "--input", str(damaged), "--output", str(output)]) == 2
    err = one_line_error(capsys, "autoencode")
    assert f"Could not read '{damaged}' as NIfTI (EOFError" in err and "truncated or corrupt" in err
    assert sorted(tmp_path.iterdir()) == [damaged]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--output", "recon.txt", "--output must be a .nii or .nii.gz file name (e.g. recon.nii.gz), got"),
        ("--output", "recon", "--output must be a .nii or .nii.gz file name (e.g. recon.nii.gz), got"),
        ("--latent-output", "latent.npy", "--latent-output must be a .nii or .nii.gz file name (e.g. latent.nii.gz)"),
        ("--output", "sub/", "--output must be a .nii or .nii.gz file name (e.g. sub.nii.gz), got"),
        ("--intensity", "nope", "Unknown --intensity 'nope'"),
        ("--vqvae", "missing.ckpt", "--vqvae 'missing.ckpt': no such file."),
        ("--vqvae", "./missing_folder", "--vqvae './missing_folder': no such file or folder (and not a Hub repo id)."),
    ],
)
def test_autoencode_checks_its_arguments_before_loading(
    option, value, message, tmp_path, capsys, monkeypatch, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    args = {"--vqvae": str(CKPT), "--input": str(EXAMPLE), "--output": "recon.nii.gz"}
    args[option] = value
    assert main(["autoencode", *(item for pair in args.items() for item in pair)]) == 2
    assert message in one_line_error(capsys, "autoencode")
    assert list(tmp_path.iterdir()) == []


def test_autoencode_refuses_to_overwrite_its_input(tmp_path, capsys, no_model_loading):
    source = tmp_path / "scan.nii.gz"
    source.write_bytes(EXAMPLE.read_bytes())
    assert main(["autoencode", "--vqvae", str(CKPT), "--input", str(source), "--output", str(source)]) == 2
    assert "would overwrite the input" in one_line_error(capsys, "autoencode")
    assert source.read_bytes() == EXAMPLE.read_bytes()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--output",
            "brain",
            "--output 'brain' is neither a NIfTI file name nor a folder: use brain.nii.gz for a file",
        ),
        ("--output", "brain.nii.gz.tmp", "use brain.nii.gz for a file, or brain.nii.gz.tmp/ (or an existing folder)"),
        (
            "--region",
            "7",
            "Unknown region '7'. Valid regions are 0: MRBrainT1 (also: MRBrain, MRT1Brain, BrainT1); 1:",
        ),
        ("--region", "CTLegs", "Unknown region 'CTLegs'. Valid regions are 0: MRBrainT1"),
        ("--steps", "0", "--num-volumes and --steps must be at least 1."),
        ("--model", "./no/such/folder", "--model './no/such/folder': no such file or folder (and not a Hub repo id)."),
        ("--model", "someone/not-cached", "is not a local folder, and the Hub repo 'someone/not-cached' could not be"),
    ],
)
def test_generate_checks_its_arguments_before_loading(
    option, value, message, tmp_path, capsys, monkeypatch, no_model_loading
):
    monkeypatch.chdir(tmp_path)
    args = {"--region": "MRBrain", "--output": "brain.nii.gz"}
    args[option] = value
    assert main(["generate", *(item for pair in args.items() for item in pair)]) == 2
    assert message in one_line_error(capsys, "generate")
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_folders_without_a_pipeline_and_other_pipelines(tmp_path, capsys, no_model_loading):
    (tmp_path / "vqvae").mkdir()
    output = str(tmp_path / "out.nii.gz")
    assert main(["generate", "--model", str(tmp_path / "vqvae"), "--region", "0", "--output", output]) == 2
    assert "has no model_index.json: pass a pipeline folder" in one_line_error(capsys, "generate")
    (tmp_path / "gem").mkdir()
    (tmp_path / "gem" / "model_index.json").write_text(json.dumps({"_class_name": "GEM3DVolumePipeline"}))
    assert main(["generate", "--model", str(tmp_path / "gem"), "--region", "0", "--output", output]) == 2
    message = one_line_error(capsys, "generate")
    assert "holds a 'GEM3DVolumePipeline'; `meddiffusers generate` runs MedDiffusionPipeline and" in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gem", "vqvae"]


def test_generate_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from meddiffusers.pipelines import MedDiffusionPipeline

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(MedDiffusionPipeline, "__call__", out_of_memory)
    assert main(["generate", "--region", "MRBrain", "--output", str(tmp_path / "brain.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading progress bar
    assert err.startswith("meddiffusers generate: error: ")
    assert err.endswith("out of memory on cpu; try a smaller --volume-size, fewer --num-volumes or --device cpu.")
    assert list(tmp_path.iterdir()) == []


def test_generate_takes_a_class_id_and_a_folder_ending_in_a_slash(tmp_path, capsys):
    folder = tmp_path / "volumes"
    assert main(["generate", "--region", "1", "--output", f"{folder}/", "--steps", "2", "--seed", "0"]) == 0
    assert [path.name for path in folder.iterdir()] == ["CTChestAbdomen_0.nii.gz"]
    image = nib.load(folder / "CTChestAbdomen_0.nii.gz")
    assert image.shape == (64, 64, 32) and image.header.get_zooms() == (4.5625, 4.5625, 7.5)
    assert "generated 1 x CTChestAbdomen volume(s)" in capsys.readouterr().out


def test_generate_help_names_regions_the_bundled_model_has(capsys):
    from meddiffusers.cli import read_model_index, regions_from_index

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "e.g. MRBrain, CTChest or 0 for the bundled demo" in text and "CTLegs" not in text
    assert "or a path ending in '/'" in text and "Any other name is refused" in text
    demo = regions_from_index(*read_model_index(demo_model_path()))
    assert [demo.resolve(name).name for name in ("MRBrain", "CTChest", "0")] == [
        "MRBrainT1",
        "CTChestAbdomen",
        "MRBrainT1",
    ]


# ---------------------------------------------------------------------------------------- regions and --version


DEMO_DESCRIPTIONS = [
    region["description"]
    for region in json.loads((Path(demo_model_path()) / "model_index.json").read_text())["regions"]
]


def test_regions_lists_the_bundled_demo_model(capsys):
    assert main(["regions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2 region(s) of ") and lines[0].endswith("meddiffusion-demo:")
    cells = [re.split(r"\s{2,}", line) for line in lines[1:4]]  # columns are separated by two or more spaces
    assert cells == [
        ["class id", "name", "aliases", "size (D x H x W)", "spacing mm (D x H x W)", "description"],
        ["0", "MRBrainT1", "MRBrain, MRT1Brain, BrainT1", "32 x 64 x 64", "8 x 4 x 4", DEMO_DESCRIPTIONS[0]],
        ["1", "CTChestAbdomen", "CTChest, CTThorax", "32 x 64 x 64", "7.5 x 4.5625 x 4.5625", DEMO_DESCRIPTIONS[1]],
    ]
    assert lines[4] == "Pass a name, an alias or a class id to `meddiffusers generate --region`."


def index_only_folder(tmp_path):
    """A copy of the demo's model_index.json alone: listing regions must not need any weights."""

    folder = tmp_path / "index_only"
    folder.mkdir()
    shutil.copy(Path(demo_model_path()) / "model_index.json", folder / "model_index.json")
    return folder


def test_regions_reads_only_model_index_json_from_a_folder_and_the_hub_cache(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from tests.hub_cache import populate_hub_cache

    folder = index_only_folder(tmp_path)
    assert main(["regions", "--model", str(folder)]) == 0
    local = capsys.readouterr().out
    assert "MRBrainT1" in local and "CTChestAbdomen" in local
    populate_hub_cache(folder, "meddiffusers-test/demo-index", tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert main(["regions", "--model", "meddiffusers-test/demo-index"]) == 0
    hub = capsys.readouterr().out
    assert hub.splitlines()[1:] == local.splitlines()[1:]
    assert hub.splitlines()[0] == "2 region(s) of meddiffusers-test/demo-index:"


def test_regions_of_a_pipeline_that_saves_none_are_the_released_classes(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MedDiffusionPipeline"}))
    assert main(["regions", "--model", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "7 region(s) of" in out and "(none saved: the pipeline defaults)" in out
    assert "CTLegs, CTLowerLimbs, CTLeg" in out and "256 x 256 x 256; 512 x 256 x 256" in out


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"_class_name": "GEM3DVolumePipeline"}), "(GEM3DVolumePipeline) defines no regions."),
        (json.dumps({"_class_name": "MedDiffusionPipeline", "regions": [{"class_id": 0}]}), "invalid 'regions' entry"),
    ],
)
def test_regions_of_bad_configurations_are_one_line_errors(index, message, tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(index)
    assert main(["regions", "--model", str(tmp_path)]) == 2
    assert message in one_line_error(capsys, "regions")


def test_version(capsys):
    from meddiffusers import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"meddiffusers {__version__} (torch ")


def test_generate_with_a_fast_scheduler_matches_the_original_sampler(tmp_path):
    """The README's `--scheduler dpm++ --steps 25` gives the volume DDIM-100 gives from the same seed."""
    common = ["generate", "--region", "MRBrain", "--seed", "0"]
    assert main([*common, "--output", str(tmp_path / "ddim.nii.gz")]) == 0
    assert main([*common, "--scheduler", "dpm++", "--steps", "25", "--output", str(tmp_path / "dpm.nii.gz")]) == 0
    reference = nib.load(tmp_path / "ddim.nii.gz").get_fdata().ravel()
    fast = nib.load(tmp_path / "dpm.nii.gz").get_fdata().ravel()
    assert np.corrcoef(reference, fast)[0, 1] >= 0.9


def test_unknown_scheduler_fails_before_loading(tmp_path, capsys, no_model_loading):
    output = tmp_path / "x.nii.gz"
    assert main(["generate", "--region", "MRBrain", "--output", str(output), "--scheduler", "magic"]) == 2
    assert "Unknown --scheduler 'magic'" in capsys.readouterr().err and not output.exists()


@pytest.fixture(scope="module")
def patch_pipeline(tmp_path_factory):
    """A tiny MedDiff-FM pipeline folder trained on 16³ windows."""
    from diffusers import DDPMScheduler

    from meddiffusers import PatchSlidingWindowPipeline, PatchUNet3DModel

    torch.manual_seed(0)
    unet = PatchUNet3DModel(
        block_out_channels=(8, 16), attention_levels=(False, True), attention_head_dim=8, norm_num_groups=4
    )
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", thresholding=True, sample_max_value=1.0)
    folder = tmp_path_factory.mktemp("patch") / "pipeline"
    PatchSlidingWindowPipeline(unet, scheduler, window_size=16).save_pretrained(folder)
    return folder


def test_generate_with_a_patch_model_writes_hounsfield_units_larger_than_one_window(patch_pipeline, tmp_path, capsys):
    output = tmp_path / "chest.nii.gz"
    args = ["generate", "--model", str(patch_pipeline), "--region", "CTChest", "--volume-size", "16", "32", "24"]
    assert main([*args, "--steps", "2", "--scheduler", "ddim", "--seed", "0", "--output", str(output)]) == 0
    image = nib.load(output)
    assert image.shape == (32, 24, 16) and image.header.get_zooms() == (1.0, 1.0, 1.0)
    values = image.get_fdata()
    assert values.min() >= -1400 - 1e-3 and values.max() <= 400 + 1e-3 and values.std() > 1  # the chest HU window
    assert "(16, 32, 24)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--volume-size", "15", "32", "24"], "multiples of 2"),
        (["--overlap", "1.5"], "--overlap"),
        (["--region", "Knee"], "Unknown region"),
    ],
)
def test_generate_with_a_patch_model_refuses_bad_requests(patch_pipeline, tmp_path, capsys, extra, message):
    output = tmp_path / "chest.nii.gz"
    args = ["generate", "--model", str(patch_pipeline), "--region", "Chest", "--steps", "2", "--output", str(output)]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err and not output.exists()


def test_window_size_is_refused_for_a_meddiffusion_model(tmp_path, capsys):
    args = ["generate", "--region", "MRBrain", "--window-size", "8", "8", "8", "--output", str(tmp_path / "a.nii")]
    assert main(args) == 2
    assert "PatchSlidingWindowPipeline" in capsys.readouterr().err
