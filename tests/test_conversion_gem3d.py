"""The converter for GEM-3D: original checkpoints -> a pipeline folder that reproduces the original volume."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import meddiffusers.pipelines.gem3d.pipeline_gem3d_volume as pipeline_module
from meddiffusers.cli import main
from meddiffusers.conversion import convert_gem3d
from meddiffusers.pipelines.gem3d import GEM3DVolumePipeline
from tests.conftest import FIXTURES
from tests.hub_cache import populate_hub_cache
from tests.malicious import RunsACommand

GEM3D = FIXTURES / "gem3d_tiny"
CONFIG = json.loads((GEM3D / "config.json").read_text())
STAGE2, SLICE = GEM3D / "stage2.ckpt", GEM3D / "slice.ckpt"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is much faster than several contended ones
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """The original configs as files, as a user passes them (JSON is valid YAML)."""
    folder = tmp_path_factory.mktemp("configs")
    paths = {}
    for name in ("stage2.ckpt", "slice.ckpt"):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(json.dumps(CONFIG["checkpoints"][name]["yaml_equivalent"]))
    return paths


@pytest.fixture(scope="module")
def converted(tmp_path_factory, configs):
    output = tmp_path_factory.mktemp("converted") / "gem3d"
    report = convert_gem3d(
        str(output),
        str(STAGE2),
        str(SLICE),
        original_config=str(configs["stage2.ckpt"]),
        slice_original_config=str(configs["slice.ckpt"]),
        max_label=4,
    )
    return output, report


def assert_reproduces_the_original_volume(pipe, monkeypatch):
    """The fixture's (h) whole-volume propagation through the loaded pipeline, replaying the recorded draws."""
    r = load_file(GEM3D / "inputs_outputs.safetensors")
    flat, table = r["h_all_draws_flat"], CONFIG["h_draw_table"]
    draws = iter([flat[d["offset_in_flat"] : d["offset_in_flat"] + d["numel"]] for d in table])
    monkeypatch.setattr(pipeline_module, "randn_tensor", lambda shape, **kwargs: next(draws).reshape(shape))
    pipe.set_progress_bar_config(disable=True)
    S, p, steps = CONFIG["h_S_p_ddim_steps"]
    out = pipe(
        mask_latents=r["h_mask_latents"].permute(0, 2, 1, 3, 4),
        informed_latents=r["h_informed_latent"],
        start_slice=p,
        num_inference_steps=steps,
        geometry="reference",
        output_type="latent",
    ).volumes
    torch.testing.assert_close(out.permute(0, 2, 1, 3, 4), r["h_R"], atol=1e-3, rtol=1e-4)


def test_converted_folder_reproduces_the_original_by_path_and_by_repo_id(converted, tmp_path, monkeypatch):
    output, report = converted
    assert sorted(os.listdir(output)) == ["README.md", "model_index.json", "scheduler", "slice_unet", "unet", "vae"]
    index = json.loads((output / "model_index.json").read_text())
    assert index["_class_name"] == "GEM3DVolumePipeline" and index["unet"] == ["meddiffusers", "GEM3DUNetModel"]
    assert index["max_label"] == 4 and index["resolution"] == 16
    scheduler = json.loads((output / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["timestep_spacing"] == "leading" and scheduler["steps_offset"] == 1
    assert scheduler["set_alpha_to_one"] is False and scheduler["beta_schedule"] == "scaled_linear"
    assert report.components == ["vae", "unet", "scheduler", "slice_unet"]
    assert set(report.mapped) == {"unet", "vae", "slice_unet"} and all(report.mapped.values())
    assert_reproduces_the_original_volume(GEM3DVolumePipeline.from_pretrained(output), monkeypatch)
    populate_hub_cache(output, "meddiffusers-test/gem3d", tmp_path / "hub")
    by_id = GEM3DVolumePipeline.from_pretrained("meddiffusers-test/gem3d", cache_dir=tmp_path / "hub")
    assert_reproduces_the_original_volume(by_id, monkeypatch)


def test_converted_weights_equal_the_single_file_load(converted):
    output, _ = converted
    direct = GEM3DVolumePipeline.from_single_file(
        STAGE2,
        slice_checkpoint=SLICE,
        original_config=CONFIG["checkpoints"]["stage2.ckpt"]["yaml_equivalent"],
        slice_original_config=CONFIG["checkpoints"]["slice.ckpt"]["yaml_equivalent"],
    )
    for name in ("unet", "vae", "slice_unet"):
        stored = load_file(output / name / "diffusion_pytorch_model.safetensors")
        expected = getattr(direct, name).state_dict()
        assert stored.keys() == expected.keys()
        assert all(torch.equal(stored[key], expected[key]) for key in expected)


def test_model_card_has_hub_metadata(converted):
    card = (converted[0] / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: meddiffusers" in card
    assert "GEM3DVolumePipeline.from_pretrained" in card and "2403.12852" in card and "stage2.ckpt" in card


def test_fp16_conversion_and_volume_model_alone(tmp_path):
    report = convert_gem3d(
        str(tmp_path / "half"),
        str(STAGE2),
        original_config=CONFIG["checkpoints"]["stage2.ckpt"],
        dtype="fp16",
    )
    assert report.components == ["vae", "unet", "scheduler"]
    assert sorted(os.listdir(tmp_path / "half")) == ["README.md", "model_index.json", "scheduler", "unet", "vae"]
    stored = load_file(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {tensor.dtype for tensor in stored.values()} == {torch.float16}
    loaded = GEM3DVolumePipeline.from_pretrained(tmp_path / "half")
    assert loaded.slice_unet is None and loaded.config.resolution == 16


def test_malicious_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "last.ckpt"
    torch.save({"state_dict": {"betas": torch.zeros(1)}, "callbacks": RunsACommand(marker)}, evil)
    with pytest.raises(ValueError, match="could execute code"):
        convert_gem3d(str(tmp_path / "out"), str(evil))
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def test_bad_inputs_fail_before_writing(tmp_path, converted):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(STAGE2.read_bytes()[:5000])
    with pytest.raises(ValueError):
        convert_gem3d(str(tmp_path / "a"), str(truncated))
    with pytest.raises(FileNotFoundError):
        convert_gem3d(str(tmp_path / "b"), str(tmp_path / "absent.ckpt"))
    with pytest.raises(ValueError, match="dtype"):
        convert_gem3d(str(tmp_path / "c"), str(STAGE2), dtype="fp8")
    with pytest.raises(ValueError, match="not empty"):
        convert_gem3d(str(converted[0]), str(STAGE2))
    assert sorted(os.listdir(tmp_path)) == ["truncated.ckpt"]


def test_failure_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(GEM3DVolumePipeline, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        convert_gem3d(str(tmp_path / "out"), str(STAGE2), original_config=CONFIG["checkpoints"]["stage2.ckpt"])
    assert os.listdir(tmp_path) == []


def test_cli_converts_gem3d_and_reports_keys(tmp_path, capsys, configs):
    args = ["convert", "--gem3d_volume_checkpoint", str(STAGE2), "--gem3d_slice_checkpoint", str(SLICE)]
    extra = ["--gem3d_original_config", str(configs["stage2.ckpt"]), "--gem3d_slice_original_config"]
    assert main([*args, *extra, str(configs["slice.ckpt"]), "--output_dir", str(tmp_path / "cli"), "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "unet:" in out and "slice_unet:" in out and "(vae, unet, scheduler, slice_unet)" in out
    assert "model.diffusion_model.input_blocks.0.0.weight ->" in out
    assert GEM3DVolumePipeline.from_pretrained(tmp_path / "cli").slice_unet is not None
    mixed = ["convert", "--gem3d_volume_checkpoint", str(STAGE2), "--vqvae_checkpoint", str(STAGE2)]
    assert main([*mixed, "--output_dir", str(tmp_path / "mixed")]) == 2
    assert "separate runs" in capsys.readouterr().err
