"""The converter: tiny original-format checkpoints → a pipeline folder that reproduces the original outputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from meddiffusers import MedDiffusionPipeline, VQModel3D
from meddiffusers.cli import main
from meddiffusers.conversion import convert
from tests.conftest import FIXTURES
from tests.hub_cache import populate_hub_cache
from tests.malicious import RunsACommand

VQVAE = FIXTURES / "patchvolume_4x_tiny" / "patchvolume_4x_tiny.ckpt"
UNET = FIXTURES / "biflownet_tiny" / "biflownet_tiny.pt"
UNET_CONFIG = FIXTURES / "biflownet_tiny" / "config.json"
SCRIPT = (
    Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoints" / "convert_meddiffusion_to_diffusers.py"
)
VOLUME = (32, 64, 64)


def convert_tiny(output_dir, **kwargs):
    # The tiny fixtures chain a patch-1 BiFlowNet with the 4x autoencoder, a pair the authors did not release.
    return convert(
        str(output_dir), str(VQVAE), str(UNET), original_config=str(UNET_CONFIG), allow_unreleased_pair=True, **kwargs
    )


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "pipe"
    convert_tiny(output)
    return output


def assert_reproduces_original(pipe):
    pipe.set_progress_bar_config(disable=True)
    unet_ref = load_file(FIXTURES / "biflownet_tiny" / "inputs_outputs.safetensors")
    tail_ref = load_file(FIXTURES / "pipeline_tiny" / "inputs_outputs.safetensors")
    sample = pipe("CTLegs", latents=unet_ref["ddim_z"], volume_size=VOLUME, output_type="latent").volumes
    torch.testing.assert_close(sample, unet_ref["ddim_sample"], atol=5e-3, rtol=0)
    with torch.no_grad():
        decoded = pipe.decode_latents(tail_ref["diffusion_sample"])
    torch.testing.assert_close(decoded, tail_ref["decoded_volume"], atol=1e-4, rtol=1e-4)


def test_converted_folder_reproduces_the_original_by_path_and_by_repo_id(converted, tmp_path):
    assert sorted(os.listdir(converted)) == ["README.md", "model_index.json", "scheduler", "unet", "vqvae"]
    assert_reproduces_original(MedDiffusionPipeline.from_pretrained(converted))
    populate_hub_cache(converted, "meddiffusers-test/converted", tmp_path / "hub")
    assert_reproduces_original(
        MedDiffusionPipeline.from_pretrained("meddiffusers-test/converted", cache_dir=tmp_path / "hub")
    )


def test_model_card_has_hub_metadata(converted):
    card = (converted / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: meddiffusers" in card and "tags:" in card
    assert "MedDiffusionPipeline.from_pretrained" in card and "doi" in card


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_reduced_precision_conversions_load_and_run(dtype, tmp_path):
    convert_tiny(tmp_path / dtype, dtype=dtype)
    stored = load_file(tmp_path / dtype / "unet" / "diffusion_pytorch_model.safetensors")
    assert stored["conv_in.weight"].dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = MedDiffusionPipeline.from_pretrained(tmp_path / dtype, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    volumes = pipe("MRBrain", volume_size=VOLUME, num_inference_steps=2, output_type="pt").volumes
    assert volumes.shape == (1, 1, *VOLUME) and torch.isfinite(volumes).all()


def test_single_component_conversion(tmp_path):
    report = convert(str(tmp_path / "ae"), vqvae_checkpoint=str(VQVAE))
    assert report.components == ["vqvae"] and len(report.dropped["vqvae"]) > 0
    VQModel3D.from_pretrained(tmp_path / "ae", subfolder="vqvae")


def test_malicious_checkpoint_is_refused_and_nothing_is_written(tmp_path):
    marker, evil = tmp_path / "pwned", tmp_path / "BiFlowNet_evil.pt"
    torch.save({"ema": {"init_conv.weight": torch.zeros(1)}, "args": RunsACommand(marker)}, evil)
    with pytest.raises(ValueError, match="could execute code"):
        convert(str(tmp_path / "out"), str(VQVAE), str(evil))
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["BiFlowNet_evil.pt"]


def test_truncated_and_wrong_kind_files_fail_before_writing(tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(UNET.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated|not a PyTorch checkpoint"):
        convert(str(tmp_path / "a"), unet_checkpoint=str(truncated))
    with pytest.raises(ValueError, match="Patch-Volume autoencoder checkpoint"):
        convert(str(tmp_path / "b"), unet_checkpoint=str(VQVAE))
    with pytest.raises(ValueError, match="not a 3D MedDiffusion Patch-Volume"):
        convert(str(tmp_path / "c"), vqvae_checkpoint=str(UNET))
    with pytest.raises(ValueError, match="released with a patch-2 BiFlowNet"):
        convert(str(tmp_path / "d"), str(VQVAE), str(UNET), original_config=str(UNET_CONFIG))
    with pytest.raises(FileNotFoundError):
        convert(str(tmp_path / "e"), vqvae_checkpoint=str(tmp_path / "absent.ckpt"))
    assert sorted(os.listdir(tmp_path)) == ["truncated.pt"]


def test_existing_output_folder_is_not_overwritten(converted):
    with pytest.raises(ValueError, match="not empty"):
        convert(str(converted), vqvae_checkpoint=str(VQVAE))


def test_cli_and_script(tmp_path, capsys):
    args = ["convert", "--vqvae_checkpoint", str(VQVAE), "--unet_checkpoint", str(UNET), "--output_dir"]
    extra = ["--original_config", str(UNET_CONFIG), "--allow_unreleased_pair", "--verbose"]
    assert main([*args, str(tmp_path / "cli"), *extra]) == 0
    out = capsys.readouterr().out
    assert "init_conv.weight -> conv_in.weight" in out and "dropped: volume_discriminator" in out
    result = subprocess.run([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path / "x")], capture_output=True)
    assert result.returncode == 2 and b"Nothing to convert" in result.stderr


def test_controlnet_conversion_gives_a_controlnet_pipeline(tmp_path):
    from meddiffusers import MedDiffusionControlNetPipeline

    controlnet = FIXTURES / "controlnet_tiny" / "controlnet_tiny.pt"
    report = convert_tiny(tmp_path / "cn", controlnet_checkpoint=str(controlnet))
    assert report.components == ["vqvae", "unet", "controlnet", "scheduler"]
    pipe = MedDiffusionControlNetPipeline.from_pretrained(tmp_path / "cn")
    pipe.set_progress_bar_config(disable=True)
    volumes = pipe("CTLegs", condition=torch.zeros(1, 1, *VOLUME), num_inference_steps=2, output_type="pt").volumes
    assert volumes.shape == (1, 1, *VOLUME) and torch.isfinite(volumes).all()
    alone = convert(str(tmp_path / "alone"), controlnet_checkpoint=str(controlnet), original_config=str(UNET_CONFIG))
    assert alone.components == ["controlnet"]


def test_each_checkpoint_is_read_once_and_the_report_is_the_loaders_key_report(tmp_path, monkeypatch):
    from meddiffusers import BiFlowNet3DModel, ControlNet3DModel, load_original_model

    controlnet = FIXTURES / "controlnet_tiny" / "controlnet_tiny.pt"
    expected = {
        "vqvae": load_original_model(VQModel3D, VQVAE)[1],
        "unet": load_original_model(BiFlowNet3DModel, UNET, original_config=UNET_CONFIG)[1],
        "controlnet": load_original_model(ControlNet3DModel, controlnet, original_config=UNET_CONFIG)[1],
    }
    reads = []
    original_load = torch.load

    def counting_load(path, *args, **kwargs):
        reads.append(os.fspath(path))
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    report = convert_tiny(tmp_path / "out", controlnet_checkpoint=str(controlnet))
    assert sorted(reads) == sorted([str(VQVAE), str(UNET), str(controlnet)])
    for name, key_report in expected.items():
        assert report.mapped[name] == key_report.mapped and report.dropped[name] == key_report.dropped
    assert ("init_conv.weight", "conv_in.weight") in report.mapped["unet"]
    assert report.dropped["unet"] == ["args", "epoch", "model", "opt", "scaler"]
    assert report.dropped["controlnet"] == []
    assert (
        report.dropped["vqvae"][0].startswith("volume_discriminator.")
        and "optimizer_states" in report.dropped["vqvae"]
    )
